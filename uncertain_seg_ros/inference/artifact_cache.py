"""A disk cache of compiled inference artefacts (ONNX graphs, OpenVINO IR, TensorRT programs).

An artefact is only valid for the exact model weights, backend, library versions, GPU, precision
and input shape it was built for. All of that is the cache key; the entry's folder is named by the
key's digest and holds ``key.json`` (the key in clear plus a SHA-256 of every artefact file).
A lookup re-reads and re-hashes the entry, so a stale, truncated or tampered entry is rebuilt,
never loaded. Entries are built in a temporary folder and renamed into place, so a crash while
building leaves no half entry behind; entries of the same model, backend, precision and shape
under other library versions or GPUs are removed when a new one is built.
"""
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)
KEY_FILE = "key.json"


def default_cache_dir() -> Path:
    """``$UNCERTAIN_SEG_CACHE``, else ``$XDG_CACHE_HOME/uncertain_seg_ros/engines``, else ``~/.cache/...``."""
    if os.environ.get("UNCERTAIN_SEG_CACHE"):
        return Path(os.environ["UNCERTAIN_SEG_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "uncertain_seg_ros" / "engines"


def device_name(device: torch.device) -> str:
    """What compiled code depends on: the GPU model and its compute capability, or the CPU."""
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} sm_{p.major}{p.minor}"
    return f"cpu {platform.machine()}"


@dataclass(frozen=True)
class ArtifactKey:
    """Everything a compiled artefact depends on."""

    model_checksum: str
    backend: str
    versions: dict[str, str] = field(default_factory=dict)
    device: str = "cpu"
    precision: str = "fp32"
    input_shape: tuple[int, ...] = ()
    options: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:20]

    @property
    def family(self) -> str:
        """Entries of one model, backend, precision and shape: a new build replaces the others
        (they were built with other library versions or for another GPU, and can never match again)."""
        return f"{self.backend}-{self.model_checksum[:12]}-{self.precision}-{'x'.join(map(str, self.input_shape))}"

    @property
    def folder_name(self) -> str:
        return f"{self.family}-{self.digest()}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ArtifactCache:
    """Folders of compiled artefacts under ``root``, one per :class:`ArtifactKey`."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root else default_cache_dir()

    def entry(self, key: ArtifactKey) -> Path:
        return self.root / key.folder_name

    def lookup(self, key: ArtifactKey) -> Path | None:
        """The entry's folder if it exists, was built for exactly ``key`` and is intact; else None."""
        folder = self.entry(key)
        meta_path = folder / KEY_FILE
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            log.warning("cache entry %s is unreadable (%s); rebuilding", folder, e)
            return None
        if meta.get("key") != key.to_dict():
            log.warning("cache entry %s was built for another key; rebuilding", folder)
            return None
        for name, digest in meta.get("files", {}).items():
            f = folder / name
            if not f.is_file() or _sha256(f) != digest:
                log.warning("cache entry %s: %s is missing or altered; rebuilding", folder, name)
                return None
        return folder

    def get_or_build(self, key: ArtifactKey, build: Callable[[Path], None]) -> Path:
        """The intact entry for ``key``, building it with ``build(folder)`` first when needed."""
        found = self.lookup(key)
        if found is not None:
            log.info("using cached %s artefact %s", key.backend, found)
            return found
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key.folder_name}-", dir=self.root))
        try:
            log.info("building %s artefact for model %s (%s, %s, input %s); this can take minutes",
                     key.backend, key.model_checksum[:12], key.device, key.precision, "x".join(map(str, key.input_shape)))
            start = time.perf_counter()
            build(tmp)
            files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            if not files:
                raise RuntimeError(f"building the {key.backend} artefact wrote no files")
            meta = {"key": key.to_dict(), "files": files, "build_seconds": round(time.perf_counter() - start, 3)}
            (tmp / KEY_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            final = self.entry(key)
            for other in self.root.glob(f"{key.family}-*"):
                if other != final and other.is_dir():
                    log.info("removing stale cache entry %s", other)
                    shutil.rmtree(other, ignore_errors=True)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            log.info("built %s artefact in %.1f s: %s", key.backend, meta["build_seconds"], final)
            return final
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
