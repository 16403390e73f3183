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
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .atomic_io import atomic_directory
from .calibration import Calibration
from .config_fields import check_keys, check_typed_fields, finite_number, integer, number_list, string
from .model import BackboneConfig, SegmenterConfig, UncertainSegmenter
from .uncertainty import UNCERTAINTY_SOURCES

log = logging.getLogger(__name__)

BUNDLE_FORMAT = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CHECKSUMS_FILE = "checksums.sha256"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ARCHITECTURE_METADATA = "architecture"
"""Key of the weights file's metadata holding ``config.model`` as written at export (sorted JSON)."""
CONFIG_FIELDS = ("format_version", "name", "backbone_name", "model", "classes", "ignore_index", "input",
                 "uncertainty_source", "calibration", "mask_threshold", "provenance")
REQUIRED_CONFIG_FIELDS = ("name", "model", "classes", "input", "uncertainty_source", "calibration", "mask_threshold")


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
        for name, values in (("mean", self.input.mean), ("std", self.input.std)):
            if len(values) != 3 or not all(math.isfinite(v) for v in values):
                raise ValueError(f"input.{name} {values} must be 3 finite numbers (R, G, B)")
        if not all(v > 0 for v in self.input.std):
            raise ValueError(f"input.std {self.input.std} must be > 0 in every channel (the input is divided by it)")
        b = self.model.backbone
        if b.embed_dim % b.num_heads:
            raise ValueError(f"model.backbone.num_heads {b.num_heads} does not divide embed_dim {b.embed_dim}")
        if self.calibration.needs_selector and not self.model.selector_hidden:
            raise ValueError("calibration.method is 'selective' but model.selector_hidden is 0: the bundle has no selector")

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
        """Read ``config.json``'s object strictly: a field that is unknown, missing, of the wrong type or
        not finite is a ValueError naming it (e.g. ``input.std[1]``, ``unknown field 'mask_treshold'``)."""
        if not isinstance(d, dict):
            raise ValueError(f"the config must be a JSON object, got {type(d).__name__}")
        version = d.get("format_version")
        if version != BUNDLE_FORMAT:
            raise ValueError(f"bundle format_version {version!r} is not supported (this build reads {BUNDLE_FORMAT})")
        check_keys(d, CONFIG_FIELDS, "", REQUIRED_CONFIG_FIELDS)
        model = check_typed_fields(SegmenterConfig, d["model"], "model")
        backbone = check_typed_fields(BackboneConfig, model.get("backbone", {}), "model.backbone")
        for key in ("embed_dim", "depth", "num_heads", "patch_size"):
            if key in backbone:
                integer(backbone[key], f"model.backbone.{key}", 1)
        inp = check_keys(d["input"], ("height", "width", "mean", "std"), "input", ("height", "width", "mean", "std"))
        if not isinstance(d["classes"], list):
            raise ValueError(f"classes must be a list, got {type(d['classes']).__name__}")
        classes = []
        for i, c in enumerate(d["classes"]):
            where = f"classes[{i}]"
            check_keys(c, ("id", "name", "color"), where, ("id", "name", "color"))
            if not isinstance(c["color"], list) or len(c["color"]) != 3:
                raise ValueError(f"{where}.color is {c['color']!r}; it must be [R, G, B]")
            classes.append(ClassInfo(integer(c["id"], f"{where}.id"), string(c["name"], f"{where}.name"),
                                     tuple(integer(v, f"{where}.color[{k}]") for k, v in enumerate(c["color"]))))
        cal = check_keys(d["calibration"], ("method", "temperature", "selective_temperature", "fit"), "calibration")
        for key in ("temperature", "selective_temperature"):
            if key in cal:
                finite_number(cal[key], f"calibration.{key}", positive=True)
        if cal.get("method") is not None:
            string(cal["method"], "calibration.method")
        if not isinstance(cal.get("fit") or {}, dict):
            raise ValueError(f"calibration.fit must be an object, got {type(cal['fit']).__name__}")
        ignore = d.get("ignore_index")
        provenance = d.get("provenance", {})
        if not isinstance(provenance, dict):
            raise ValueError(f"provenance must be an object, got {type(provenance).__name__}")
        cfg = cls(
            name=string(d["name"], "name"),
            backbone_name=string(d.get("backbone_name", ""), "backbone_name"),
            model=SegmenterConfig.from_dict(model),
            classes=classes,
            ignore_index=None if ignore is None else integer(ignore, "ignore_index"),
            input=InputSpec(integer(inp["height"], "input.height", 1), integer(inp["width"], "input.width", 1),
                            number_list(inp["mean"], "input.mean", 3), number_list(inp["std"], "input.std", 3, positive=True)),
            uncertainty_source=string(d["uncertainty_source"], "uncertainty_source"),
            calibration=Calibration.from_dict(cal),
            mask_threshold=finite_number(d["mask_threshold"], "mask_threshold"),
            provenance=dict(provenance),
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


def weights_digest(path: Path) -> str:
    """sha256 of a safetensors file as it reads with its metadata entries in sorted order.

    The safetensors writer stores its metadata map in hash order, which varies from one process to
    the next, so bit-identical weights can give files that differ in a few header bytes. This digest
    is the same for all of them (it is the file's own sha256 when the entries happen to be sorted,
    which keeps the ids of bundles exported before it); the model id and the engine-cache key use it.
    """
    with open(path, "rb") as f:
        size = f.read(8)
        header = f.read(int.from_bytes(size, "little"))
        parsed = json.loads(header)
        if isinstance(parsed.get("__metadata__"), dict):
            parsed["__metadata__"] = dict(sorted(parsed["__metadata__"].items()))
        canonical = json.dumps(parsed, separators=(",", ":"), ensure_ascii=False).encode()
        h = hashlib.sha256(size + canonical.ljust(len(header), b" "))
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
        architecture = json.dumps(config.model.to_dict(), sort_keys=True)
        save_file(state, str(tmp / WEIGHTS_FILE),
                  metadata={"format": "pt", "bundle_format": str(BUNDLE_FORMAT), ARCHITECTURE_METADATA: architecture})
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
        name = parts[1].lstrip("*")
        if name in (".", "..") or "/" in name or "\\" in name:
            raise BundleError(f"{sums_file} line {n} names {name!r}, which is not a file of the bundle; "
                              f"checksums may only name files directly in {path}")
        expected[name] = parts[0].lower()
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
    dtypes = [f"{k}: file {state[k].dtype} vs model {own[k].dtype}"
              for k in sorted(set(own) & set(state)) if state[k].dtype != own[k].dtype]
    if missing or unexpected or shapes or dtypes:
        b = config.model.backbone
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} tensors (e.g. {missing[:3]})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[:3]})")
        if shapes:
            problems.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:3]})")
        if dtypes:
            problems.append(f"{len(dtypes)} dtype mismatches (e.g. {dtypes[:3]})")
        raise BundleError(
            f"{WEIGHTS_FILE} does not match the architecture in {CONFIG_FILE} (embed_dim={b.embed_dim}, "
            f"depth={b.depth}, classes={config.model.num_classes}): " + "; ".join(problems)
        )


def _check_architecture_record(weights: Path, config: BundleConfig) -> None:
    """The architecture the weights were exported with (their metadata) must be the config's: fields
    such as ``num_heads`` change the computation without changing any tensor's shape. Bundles
    exported before the record existed have none: they load, with a warning that says so."""
    with safe_open(str(weights), "pt") as f:
        recorded = (f.metadata() or {}).get(ARCHITECTURE_METADATA)
    if recorded is None:
        log.warning("%s was exported before bundles recorded their architecture: fields that change no tensor's "
                    "shape (e.g. num_heads) cannot be checked against %s; export it again with this version",
                    weights, CONFIG_FILE)
        return
    try:
        exported = _flatten(json.loads(recorded), "model")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise BundleError(f"{weights} has an unreadable '{ARCHITECTURE_METADATA}' metadata entry: {exc}") from exc
    configured = _flatten(config.model.to_dict(), "model")
    differ = [f"{k}: {CONFIG_FILE} says {configured.get(k)!r}, the weights were exported with {exported.get(k)!r}"
              for k in sorted(set(exported) | set(configured)) if exported.get(k) != configured.get(k)]
    if differ:
        raise BundleError(f"{weights} was exported for another architecture than {CONFIG_FILE} describes: "
                          + "; ".join(differ))


def _flatten(d: dict, prefix: str) -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}") if isinstance(v, dict) else {f"{prefix}.{k}": v})
    return out


def _check_finite(weights: Path, state: dict[str, torch.Tensor]) -> None:
    """Fail closed: a NaN or inf anywhere in the weights makes every output meaningless."""
    bad = [k for k, v in sorted(state.items()) if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise BundleError(f"{weights} holds non-finite values (NaN or inf) in {len(bad)} tensors (e.g. {bad[:3]}); "
                          "such a model cannot be trusted with any pixel")


def read_config(path: str | os.PathLike) -> BundleConfig:
    """A bundle's ``config.json``, validated, without checking or reading the weights (e.g. for a
    legend of its classes); :func:`load_bundle` reads it the same way after verifying the checksums."""
    path = Path(path)
    try:
        raw = json.loads((path / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path / CONFIG_FILE} is not valid JSON: {exc}") from exc
    except OSError as exc:
        raise BundleError(f"{path / CONFIG_FILE} cannot be read: {exc}") from exc
    try:
        return BundleConfig.from_dict(raw)
    except (KeyError, TypeError, ValueError) as exc:
        missing = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise BundleError(f"{path / CONFIG_FILE} is invalid: {missing}") from exc


def load_bundle(path: str | os.PathLike, device: str | torch.device = "cpu") -> Bundle:
    """Verify and load a bundle; raises BundleError with the reason when anything is wrong.

    Refused: missing, truncated or tampered files (checksums), a config that is not a JSON object or
    has an unknown, missing, mistyped or non-finite field, weights that do not match the config's
    architecture (tensor names, shapes, dtypes, and the architecture recorded in the weights'
    metadata), and weights that are not all finite.
    """
    path = Path(path)
    verify_bundle(path)
    config = read_config(path)
    weights = path / WEIGHTS_FILE
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise BundleError(f"{weights} is not a readable safetensors file: {exc}") from exc
    model = UncertainSegmenter(config.model)
    _check_state_dict(model, state, config)
    _check_architecture_record(weights, config)
    _check_finite(weights, state)
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    digest = weights_digest(weights)
    return Bundle(path=path, config=config, model=model, model_id=digest[:12], model_checksum=digest)
