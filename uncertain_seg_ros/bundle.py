"""The model bundle: the folder a trainer exports and the node loads.

``model.safetensors`` (weights, no pickle), ``config.json`` (architecture, classes, input
normalisation, uncertainty source, calibration, mask threshold, provenance) and
``checksums.sha256`` (``sha256sum`` format). Loading verifies every checksum before reading a byte
of weights, so a truncated, tampered or half-copied bundle is refused with a message naming the
problem.
"""
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic_io import atomic_directory
from .calibration import Calibration
from .model import SegmenterConfig, UncertainSegmenter
from .uncertainty import UNCERTAINTY_SOURCES

log = logging.getLogger(__name__)

BUNDLE_FORMAT = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CHECKSUMS_FILE = "checksums.sha256"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BundleError(RuntimeError):
    """A model bundle is missing, broken, tampered with or inconsistent."""


@dataclass(frozen=True)
class ClassInfo:
    id: int
    name: str
    color: tuple[int, int, int]


@dataclass(frozen=True)
class InputSpec:
    """Network input size (multiples of the patch size) and the RGB normalisation."""

    height: int
    width: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass
class BundleConfig:
    """Everything besides the weights that the node needs to run a model and interpret its outputs."""

    name: str
    model: SegmenterConfig
    classes: list[ClassInfo]
    input: InputSpec
    ignore_index: int | None = None
    backbone_name: str = ""
    uncertainty_source: str = "max_softmax"
    calibration: Calibration = field(default_factory=Calibration)
    mask_threshold: float = 0.5
    provenance: dict = field(default_factory=dict)
    format_version: int = BUNDLE_FORMAT

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        if len(self.classes) != self.model.num_classes:
            raise ValueError(f"{len(self.classes)} classes listed but the model has {self.model.num_classes} outputs")
        for i, c in enumerate(self.classes):
            if c.id != i:
                raise ValueError(f"class ids must be 0..K-1 in order; entry {i} has id {c.id}")
            if len(c.color) != 3 or not all(0 <= v <= 255 for v in c.color):
                raise ValueError(f"class {c.name!r} colour {c.color} is not an RGB triple in 0..255")
        p = self.model.backbone.patch_size
        if self.input.height % p or self.input.width % p or self.input.height <= 0 or self.input.width <= 0:
            raise ValueError(f"input size {self.input.height}x{self.input.width} must be positive multiples of {p}")
        if self.uncertainty_source not in UNCERTAINTY_SOURCES:
            raise ValueError(f"uncertainty_source {self.uncertainty_source!r} not in {UNCERTAINTY_SOURCES}")
        if not 0.0 <= self.mask_threshold <= 1.0:
            raise ValueError(f"mask_threshold must be in [0, 1], got {self.mask_threshold}")

    @property
    def palette(self) -> np.ndarray:
        """(K, 3) uint8 RGB colours, indexed by class id."""
        return np.array([c.color for c in self.classes], dtype=np.uint8)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def to_dict(self) -> dict:
        return {
            "format_version": self.format_version,
            "name": self.name,
            "backbone_name": self.backbone_name,
            "model": self.model.to_dict(),
            "classes": [{"id": c.id, "name": c.name, "color": list(c.color)} for c in self.classes],
            "ignore_index": self.ignore_index,
            "input": {
                "height": self.input.height,
                "width": self.input.width,
                "mean": list(self.input.mean),
                "std": list(self.input.std),
            },
            "uncertainty_source": self.uncertainty_source,
            "calibration": self.calibration.to_dict(),
            "mask_threshold": self.mask_threshold,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "BundleConfig":
        version = d.get("format_version")
        if version != BUNDLE_FORMAT:
            raise ValueError(f"bundle format_version {version!r} is not supported (this build reads {BUNDLE_FORMAT})")
        inp = d["input"]
        cfg = cls(
            name=d["name"],
            backbone_name=d.get("backbone_name", ""),
            model=SegmenterConfig.from_dict(d["model"]),
            classes=[ClassInfo(int(c["id"]), str(c["name"]), tuple(int(v) for v in c["color"])) for c in d["classes"]],
            ignore_index=d.get("ignore_index"),
            input=InputSpec(int(inp["height"]), int(inp["width"]), tuple(inp["mean"]), tuple(inp["std"])),
            uncertainty_source=d["uncertainty_source"],
            calibration=Calibration.from_dict(d["calibration"]),
            mask_threshold=float(d["mask_threshold"]),
            provenance=dict(d.get("provenance", {})),
        )
        cfg.validate()
        return cfg


@dataclass
class Bundle:
    """A loaded, verified bundle: the model in eval mode on its device, and its config."""

    path: Path
    config: BundleConfig
    model: UncertainSegmenter
    model_id: str
    model_checksum: str = ""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_bundle(path: str | os.PathLike, model: UncertainSegmenter, config: BundleConfig) -> Path:
    """Write a bundle folder atomically (an existing bundle at ``path`` is replaced whole)."""
    config.validate()
    if model.cfg != config.model:
        raise ValueError("the model's architecture differs from config.model")
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_directory(path) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "bundle_format": str(BUNDLE_FORMAT)})
        (tmp / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
        lines = [f"{sha256_file(tmp / n)}  {n}\n" for n in (WEIGHTS_FILE, CONFIG_FILE)]
        (tmp / CHECKSUMS_FILE).write_text("".join(lines))
    log.info("saved model bundle %s", path)
    return path


def verify_bundle(path: str | os.PathLike) -> dict[str, str]:
    """Check that the bundle's files exist and match their recorded sha256; return name -> digest."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"model bundle {path} does not exist or is not a folder")
    sums_file = path / CHECKSUMS_FILE
    if not sums_file.is_file():
        raise BundleError(f"model bundle {path} has no {CHECKSUMS_FILE}; it was not exported by uncertain-seg or is incomplete")
    expected: dict[str, str] = {}
    for n, line in enumerate(sums_file.read_text(errors="replace").splitlines(), 1):
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) != 64:
            raise BundleError(f"{sums_file} line {n} is not '<sha256>  <file>': {line!r}")
        expected[parts[1].lstrip("*")] = parts[0].lower()
    for required in (WEIGHTS_FILE, CONFIG_FILE):
        if required not in expected:
            raise BundleError(f"{sums_file} does not list {required}")
    for name, digest in expected.items():
        f = path / name
        if not f.is_file():
            raise BundleError(f"model bundle {path} is missing {name}")
        actual = sha256_file(f)
        if actual != digest:
            raise BundleError(
                f"checksum mismatch for {f} ({f.stat().st_size} bytes): expected sha256 {digest[:16]}..., "
                f"got {actual[:16]}...; the file was modified or truncated after export"
            )
    return expected


def _check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], config: BundleConfig) -> None:
    """Name every key and shape that differs between the weights and the architecture in the config."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs config {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        b = config.model.backbone
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} tensors (e.g. {missing[:3]})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[:3]})")
        if shapes:
            problems.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:3]})")
        raise BundleError(
            f"{WEIGHTS_FILE} does not match the architecture in {CONFIG_FILE} (embed_dim={b.embed_dim}, "
            f"depth={b.depth}, classes={config.model.num_classes}): " + "; ".join(problems)
        )


def load_bundle(path: str | os.PathLike, device: str | torch.device = "cpu") -> Bundle:
    """Verify and load a bundle; raises BundleError with the reason when anything is wrong."""
    path = Path(path)
    digests = verify_bundle(path)
    try:
        raw = json.loads((path / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path / CONFIG_FILE} is not valid JSON: {exc}") from exc
    try:
        config = BundleConfig.from_dict(raw)
    except (KeyError, TypeError, ValueError) as exc:
        missing = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise BundleError(f"{path / CONFIG_FILE} is invalid: {missing}") from exc
    try:
        state = load_file(str(path / WEIGHTS_FILE))
    except (SafetensorError, OSError) as exc:
        raise BundleError(f"{path / WEIGHTS_FILE} is not a readable safetensors file: {exc}") from exc
    model = UncertainSegmenter(config.model)
    _check_state_dict(model, state, config)
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    return Bundle(path=path, config=config, model=model, model_id=digests[WEIGHTS_FILE][:12],
                  model_checksum=digests[WEIGHTS_FILE])
