"""Camera frames in, published outputs out, all on the inference device.

Upload uint8 pixels, resize and normalise on the device, run the network once for every frame of
the same size (several cameras batch together), decode at each camera's resolution and compute
only the outputs somebody asked for; only those are downloaded.
"""
from dataclasses import dataclass

import numpy as np
import torch

from ..bundle import Bundle
from ..colormap import COLORMAPS, colorize_labels, colorize_scalar
from ..overlay import MARK_COLOR, overlay
from ..prediction import decode
from ..preprocessing import to_input

OUTPUT_KINDS = ("labels", "labels_color", "uncertainty", "uncertainty_color", "mask", "overlay")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class PredictorOptions:
    """Run-time choices of the node that are not part of the bundle."""

    device: str = "cpu"
    precision: str = "fp32"
    mask_threshold: float | None = None
    colormap: str = "inferno"
    overlay_alpha: float = 0.5

    def __post_init__(self) -> None:
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
    uncertain_fraction: float = 0.0


class Predictor:
    """A loaded bundle ready to segment camera frames (PyTorch backend)."""

    def __init__(self, bundle: Bundle, options: PredictorOptions = PredictorOptions()) -> None:
        self.bundle = bundle
        self.options = options
        self.device = torch.device(options.device)
        self.dtype = PRECISIONS[options.precision]
        if self.device.type == "cpu" and self.dtype == torch.float16:
            raise ValueError("precision fp16 needs a CUDA device; use fp32 or bf16 on the CPU")
        cfg = bundle.config
        self.model = bundle.model.to(self.device).eval()
        self.input_size = (cfg.input.height, cfg.input.width)
        self.threshold = cfg.mask_threshold if options.mask_threshold is None else options.mask_threshold
        self.palette = torch.as_tensor(cfg.palette, device=self.device)
        self.mean = torch.tensor(cfg.input.mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(cfg.input.std, dtype=torch.float32, device=self.device)
        self.mark_color = torch.tensor(MARK_COLOR, dtype=torch.float32, device=self.device)
        self.label_dtype = np.uint8 if cfg.model.num_classes <= 256 else np.uint16

    @property
    def model_id(self) -> str:
        return self.bundle.model_id

    @torch.inference_mode()
    def _network(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x = to_input(torch.stack(images), self.input_size, self.mean, self.std)
        if self.dtype == torch.float32:
            return self.model(x)
        with torch.autocast(self.device.type, dtype=self.dtype):
            return self.model(x)

    @torch.inference_mode()
    def run(
        self, images: list[np.ndarray], wanted: set[str] | frozenset[str] | list[set[str]] = frozenset(OUTPUT_KINDS)
    ) -> list[FrameOutputs]:
        """Segment (H, W, 3) uint8 RGB frames; frames of equal size share one network call.

        ``wanted`` names the outputs to compute, for all frames or as one set per frame.
        """
        per_frame = [set(w) for w in wanted] if isinstance(wanted, list) else [set(wanted)] * len(images)
        if len(per_frame) != len(images):
            raise ValueError(f"{len(per_frame)} output sets for {len(images)} frames")
        unknown = set().union(*per_frame) - set(OUTPUT_KINDS)
        if unknown:
            raise ValueError(f"unknown outputs {sorted(unknown)}; choose from {OUTPUT_KINDS}")
        uploaded = [torch.from_numpy(np.ascontiguousarray(im)).to(self.device, non_blocking=True) for im in images]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(uploaded):
            groups.setdefault(tuple(im.shape[:2]), []).append(i)
        results: list[FrameOutputs | None] = [None] * len(images)
        for size, idx in groups.items():
            logits, loss = self._network([uploaded[i] for i in idx])
            for j, i in enumerate(idx):
                results[i] = self._outputs(uploaded[i], logits[j : j + 1], loss[j : j + 1], size, per_frame[i])
        return results

    def _outputs(self, image: torch.Tensor, logits: torch.Tensor, loss: torch.Tensor, size: tuple[int, int], wanted) -> FrameOutputs:
        cfg = self.bundle.config
        pred = decode(logits, loss, size, cfg.calibration, cfg.uncertainty_source, self.threshold, selector=self.model.selector)
        labels, unc, mask = pred.labels[0], pred.uncertainty[0], pred.mask[0]
        out = FrameOutputs(uncertain_fraction=float(mask.float().mean()))
        labels_rgb = colorize_labels(labels, self.palette) if {"labels_color", "overlay"} & wanted else None
        host = {
            "labels": lambda: labels.to(torch.int32).cpu().numpy().astype(self.label_dtype),
            "labels_color": lambda: labels_rgb.cpu().numpy(),
            "uncertainty": lambda: unc.float().cpu().numpy(),
            "uncertainty_color": lambda: colorize_scalar(unc, self.options.colormap).cpu().numpy(),
            "mask": lambda: (mask.to(torch.uint8) * 255).cpu().numpy(),
            "overlay": lambda: overlay(image, labels_rgb, mask, self.options.overlay_alpha, self.mark_color).cpu().numpy(),
        }
        for kind in wanted:
            setattr(out, kind, host[kind]())
        return out

