"""Camera frames in, published outputs out, all on the inference device.

Upload uint8 pixels, resize and normalise on the device, run the network once for every frame of
the same size (several cameras batch together) through the chosen backend, decode at each camera's
resolution and compute only the outputs somebody asked for; only those are downloaded. The three
stages are public (:meth:`Predictor.prepare`, :meth:`Predictor.infer`, :meth:`Predictor.finish`) so
that the benchmark can time each; :meth:`Predictor.run` chains them.
"""
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..bundle import Bundle
from ..colormap import COLORMAPS, colorize_labels, colorize_scalar
from ..overlay import MARK_COLOR, overlay
from ..prediction import decode
from ..preprocessing import fit_pixels, to_input
from .artifact_cache import ArtifactCache
from .backend import PRECISIONS
from .factory import BACKENDS, create_backend

OUTPUT_KINDS = ("labels", "labels_color", "uncertainty", "uncertainty_color", "mask", "overlay")


@dataclass(frozen=True)
class PredictorOptions:
    """Run-time choices of the node that are not part of the bundle."""

    device: str = "cpu"
    precision: str = "fp32"
    mask_threshold: float | None = None
    colormap: str = "inferno"
    overlay_alpha: float = 0.5
    backend: str = "torch"
    max_batch: int = 1
    cache_dir: str | None = None
    max_output_pixels: int | None = None
    """Frames with more pixels are shrunk to this many (same aspect ratio) before anything is computed,
    so their outputs come at that reduced size: memory and time per frame stay bounded."""
    threads: int | None = None
    """CPU threads of the network and of PyTorch's pre- and post-processing (PyTorch's count is
    process-wide, set when the predictor is built); 0 or None keeps the process's setting."""
    openvino_device: str = "CPU"
    """Where the openvino backend runs the network: ``CPU``, or ``GPU`` for an Intel GPU."""

    def __post_init__(self) -> None:
        if self.backend not in ("auto", *BACKENDS):
            raise ValueError(f"backend must be auto or one of {BACKENDS}, got {self.backend!r}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.threads is not None and self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0: keep the process's setting), got {self.threads}")
        if self.max_output_pixels is not None and self.max_output_pixels < 1:
            raise ValueError(f"max_output_pixels must be >= 1, got {self.max_output_pixels}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {self.precision!r}")
        if self.colormap not in COLORMAPS:
            raise ValueError(f"colormap must be one of {COLORMAPS}, got {self.colormap!r}")
        if not 0.0 <= self.overlay_alpha <= 1.0:
            raise ValueError(f"overlay_alpha must be in [0, 1], got {self.overlay_alpha}")
        if self.mask_threshold is not None and not 0.0 <= self.mask_threshold <= 1.0:
            raise ValueError(f"mask_threshold must be in [0, 1], got {self.mask_threshold}")


@dataclass
class FrameOutputs:
    """The requested outputs of one frame as host arrays at the camera's resolution (others are None)."""

    labels: np.ndarray | None = None
    labels_color: np.ndarray | None = None
    uncertainty: np.ndarray | None = None
    uncertainty_color: np.ndarray | None = None
    mask: np.ndarray | None = None
    overlay: np.ndarray | None = None
    size: tuple[int, int] = (0, 0)
    """(height, width) of the outputs: the camera's, or smaller above ``max_output_pixels``."""
    uncertain_fraction: float = 0.0
    nonfinite_pixels: int = 0
    """Pixels whose network outputs were not finite; they are published as uncertain (mask on)."""


@dataclass
class Prepared:
    """Frames uploaded to the device, grouped by size, with each group's network input."""

    uploaded: list[torch.Tensor]
    groups: dict[tuple[int, int], list[int]]
    inputs: dict[tuple[int, int], torch.Tensor]


class Predictor:
    """A loaded bundle ready to segment camera frames, behind the backend ``options.backend``.

    Compiled backends are built (or loaded from the artefact cache) here, for batches of up to
    ``options.max_batch`` frames of one size; larger groups are split. ``options.threads`` sets
    PyTorch's thread count for the whole process here, and the backend's own.
    """

    def __init__(self, bundle: Bundle, options: PredictorOptions = PredictorOptions()) -> None:
        self.bundle = bundle
        self.options = options
        self.device = torch.device(options.device)
        cfg = bundle.config
        if options.threads:
            torch.set_num_threads(options.threads)
        self.backend = create_backend(options.backend, bundle, self.device, options.precision, options.max_batch,
                                      ArtifactCache(options.cache_dir), threads=options.threads or None,
                                      openvino_device=options.openvino_device)
        self.model = bundle.model
        self.input_size = (cfg.input.height, cfg.input.width)
        self.threshold = cfg.mask_threshold if options.mask_threshold is None else options.mask_threshold
        self.palette = torch.as_tensor(cfg.palette, device=self.device)
        self.mean = torch.tensor(cfg.input.mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(cfg.input.std, dtype=torch.float32, device=self.device)
        self.mark_color = torch.tensor(MARK_COLOR, dtype=torch.float32, device=self.device)
        self.label_dtype = np.uint8 if cfg.model.num_classes <= 256 else np.uint16
        # narrowed on the device, so that a uint8 label map is downloaded and published without another copy
        self._label_device_dtype = torch.uint8 if self.label_dtype == np.uint8 else torch.int32

    @property
    def model_id(self) -> str:
        return self.bundle.model_id

    def configure(self, mask_threshold: float | None, colormap: str, overlay_alpha: float) -> None:
        """Change how outputs are drawn from the next frame on (the node's live parameters); validated
        like :class:`PredictorOptions`. ``mask_threshold`` None: the bundle's calibrated threshold."""
        self.options = replace(self.options, mask_threshold=mask_threshold, colormap=colormap, overlay_alpha=overlay_alpha)
        cfg = self.bundle.config
        self.threshold = cfg.mask_threshold if mask_threshold is None else mask_threshold

    @torch.inference_mode()
    def prepare(self, images: list[np.ndarray]) -> Prepared:
        """Upload (H, W, 3) uint8 RGB frames; resize and normalise each size group on the device.

        A frame above ``options.max_output_pixels`` is shrunk on the host first (area averaging), so
        its outputs are computed and published at the reduced size.
        """
        limit = self.options.max_output_pixels
        uploaded = [torch.from_numpy(np.ascontiguousarray(fit_pixels(im, limit))).to(self.device, non_blocking=True)
                    for im in images]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(uploaded):
            groups.setdefault(tuple(im.shape[:2]), []).append(i)
        inputs = {size: to_input(torch.stack([uploaded[i] for i in idx]), self.input_size, self.mean, self.std)
                  for size, idx in groups.items()}
        return Prepared(uploaded, groups, inputs)

    @torch.inference_mode()
    def infer(self, prepared: Prepared) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
        """The network on every size group, in batches of at most ``max_batch`` frames."""
        out = {}
        step = self.options.max_batch
        for size, x in prepared.inputs.items():
            parts = [self.backend(x[i : i + step]) for i in range(0, x.shape[0], step)]
            out[size] = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])) if len(parts) > 1 else parts[0]
        return out

    @torch.inference_mode()
    def finish(self, prepared: Prepared, network_out: dict, wanted: list[set[str]]) -> list[FrameOutputs]:
        """Decode each frame at its camera's resolution and download the requested outputs."""
        results: list[FrameOutputs | None] = [None] * len(prepared.uploaded)
        for size, idx in prepared.groups.items():
            logits, loss = network_out[size]
            for j, i in enumerate(idx):
                results[i] = self._outputs(prepared.uploaded[i], logits[j : j + 1], loss[j : j + 1], size, wanted[i])
        return results

    def run(
        self, images: list[np.ndarray], wanted: set[str] | frozenset[str] | list[set[str]] = frozenset(OUTPUT_KINDS)
    ) -> list[FrameOutputs]:
        """Segment (H, W, 3) uint8 RGB frames; frames of equal size share one network call.

        ``wanted`` names the outputs to compute, for all frames or as one set per frame.
        """
        per_frame = self.check_wanted(wanted, len(images))
        prepared = self.prepare(images)
        return self.finish(prepared, self.infer(prepared), per_frame)

    @staticmethod
    def check_wanted(wanted: set[str] | frozenset[str] | list[set[str]], n: int) -> list[set[str]]:
        """``wanted`` as one validated set per frame."""
        per_frame = [set(w) for w in wanted] if isinstance(wanted, list) else [set(wanted)] * n
        if len(per_frame) != n:
            raise ValueError(f"{len(per_frame)} output sets for {n} frames")
        unknown = set().union(*per_frame) - set(OUTPUT_KINDS)
        if unknown:
            raise ValueError(f"unknown outputs {sorted(unknown)}; choose from {OUTPUT_KINDS}")
        return per_frame

    def _outputs(self, image: torch.Tensor, logits: torch.Tensor, loss: torch.Tensor, size: tuple[int, int], wanted) -> FrameOutputs:
        cfg = self.bundle.config
        pred = decode(logits, loss, size, cfg.calibration, cfg.uncertainty_source, self.threshold, selector=self.model.selector)
        labels, unc, mask = pred.labels[0], pred.uncertainty[0], pred.mask[0]
        out = FrameOutputs(size=tuple(image.shape[:2]), uncertain_fraction=int(mask.count_nonzero()) / mask.numel(),
                           nonfinite_pixels=int(pred.nonfinite[0]))
        labels_rgb = colorize_labels(labels, self.palette) if {"labels_color", "overlay"} & wanted else None
        host = {
            "labels": lambda: labels.to(self._label_device_dtype).cpu().numpy().astype(self.label_dtype, copy=False),
            "labels_color": lambda: labels_rgb.cpu().numpy(),
            "uncertainty": lambda: unc.float().cpu().numpy(),
            "uncertainty_color": lambda: colorize_scalar(unc, self.options.colormap).cpu().numpy(),
            "mask": lambda: mask.to(torch.uint8).mul_(255).cpu().numpy(),
            "overlay": lambda: overlay(image, labels_rgb, mask, self.options.overlay_alpha, self.mark_color).cpu().numpy(),
        }
        for kind in wanted:
            setattr(out, kind, host[kind]())
        return out

