"""Calibration of class probabilities: none, temperature scaling, or selective scaling.

- **Temperature scaling** divides every logit by one fitted ``T`` (Guo et al. 2017).
- **Selective scaling** (Wang et al., CVPR 2023, "On calibrating semantic segmentation models:
  analyses and an algorithm"): a small per-pixel selector, an MLP on the log-softmax of the
  uncalibrated logits, flags likely mispredictions; flagged pixels' logits are divided by a large
  temperature ``T_sel``, the others by the temperature-scaling ``T`` (selective scaling on top of
  temperature scaling; T = 1 leaves them as they are).

Both only divide logits by a positive number per pixel, so the argmax (the published labels) never
changes. The :class:`Calibration` record lives in the bundle's ``config.json``; the selector's
weights live in the model (``UncertainSegmenter.selector``), hence in ``model.safetensors``.
Fitting is offline, in ``uncertain_seg_training.calibrate``.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

CALIBRATION_METHODS = ("none", "temperature", "selective")
CPU_ROWS = 4096


class SelectiveScaler(nn.Module):
    """Per-pixel misprediction selector: log-softmax (B, K, H, W) -> selector logit (B, 1, H, W).

    ``K -> hidden -> hidden -> 1`` with ReLU, written as 1x1 convolutions so that it runs on whole
    logit maps on the inference device. A pixel is flagged when ``sigmoid(logit) > 0.5``, i.e.
    when the logit is positive.
    """

    def __init__(self, num_classes: int, hidden: int = 64) -> None:
        super().__init__()
        if num_classes < 2 or hidden < 1:
            raise ValueError(f"SelectiveScaler needs num_classes >= 2 and hidden >= 1, got {num_classes}, {hidden}")
        self.num_classes = num_classes
        self.hidden = hidden
        self.mlp = nn.Sequential(
            nn.Conv2d(num_classes, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 1, 1),
        )

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        """Selector logits (B, 1, H, W) from *uncalibrated* class logits (B, K, H, W).

        The 1x1 convolutions run as matrix products over the class axis moved last, the same
        function: on a 480x360 frame's logits (173k pixels) oneDNN's 1x1 convolutions took 92 ms on
        2 CPU cores, the blocked matrix products 26 ms.
        """
        if logits.ndim != 4 or logits.shape[1] != self.num_classes:
            raise ValueError(f"expected logits (B, {self.num_classes}, H, W), got {tuple(logits.shape)}")
        x = F.log_softmax(logits.to(self.mlp[0].weight.dtype), dim=1)
        return self._mlp(x.movedim(1, -1).contiguous()).movedim(-1, 1)

    def forward_rows(self, logits: torch.Tensor) -> torch.Tensor:
        """Selector logits (N,) of pixel rows (N, K): the same function as :meth:`forward` (used when fitting)."""
        return self._mlp(F.log_softmax(logits.to(self.mlp[0].weight.dtype), dim=1))[:, 0]

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        """The 1x1 convolutions as linear layers over the last (class) axis of ``x`` (..., K) -> (..., 1).

        On the CPU the pixels go through in blocks of ``CPU_ROWS`` so that the hidden activations
        stay in cache (31 vs 85 ms for one pass over a 480x360 frame); on CUDA in one pass.
        """
        rows = x.reshape(-1, x.shape[-1])
        parts = []
        for h in rows.split(CPU_ROWS) if rows.device.type == "cpu" else (rows,):
            for layer in self.mlp:
                h = F.linear(h, layer.weight.flatten(1), layer.bias) if isinstance(layer, nn.Conv2d) else layer(h)
            parts.append(h)
        return torch.cat(parts).reshape(*x.shape[:-1], 1)


@dataclass(frozen=True)
class Calibration:
    """How logits become calibrated probabilities; stored in the model bundle's ``config.json``.

    ``method`` is "none", "temperature" (all logits / ``temperature``) or "selective" (logits of
    pixels the selector flags / ``selective_temperature``, the others / ``temperature``). Left
    out, ``method`` follows the temperature: "temperature" when it is not 1,
    "none" otherwise, which is how configs that only had ``temperature`` are read. ``fit`` records
    how the values were fitted (data, pixels, NLL / ECE before and after) and does not affect
    :meth:`apply`.
    """

    temperature: float = 1.0
    method: str | None = None
    selective_temperature: float = 1.0
    fit: dict = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.method is None:
            object.__setattr__(self, "method", "none" if self.temperature == 1.0 else "temperature")
        if self.method not in CALIBRATION_METHODS:
            raise ValueError(f"calibration method must be one of {CALIBRATION_METHODS}, got {self.method!r}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be finite and > 0, got {self.temperature}")
        if not (self.selective_temperature > 0 and math.isfinite(self.selective_temperature)):
            raise ValueError(f"selective_temperature must be finite and > 0 (an infinite one flattens the flagged "
                             f"pixels' probabilities and changes their labels), got {self.selective_temperature}")
        if not isinstance(self.fit, dict):
            raise ValueError(f"calibration fit must be a dict, got {type(self.fit).__name__}")

    @property
    def needs_selector(self) -> bool:
        """True when :meth:`apply` needs the selector's flags (``prediction.selector_flags``)."""
        return self.method == "selective"

    def apply(self, logits: torch.Tensor, flagged: torch.Tensor | None = None) -> torch.Tensor:
        """Calibrated logits (B, K, H, W); "selective" needs ``flagged`` (B, H, W), the selector's flags of those pixels.

        Flagged pixels are divided by ``selective_temperature``, the others by ``temperature``: one
        division by a per-pixel map, 0.6 ms on a 480x360 frame's 11 classes with 2 CPU threads, where
        ``torch.where`` over the broadcast flags took 10 ms.
        """
        if self.method == "temperature":
            return logits if self.temperature == 1.0 else logits / self.temperature
        if self.method == "selective":
            if flagged is None:
                raise ValueError(
                    "selective calibration needs the model's selector, but none was given: pass "
                    "selector=model.selector (the bundle's model must have SegmenterConfig.selector_hidden > 0)"
                )
            return logits / torch.where(flagged, self.selective_temperature, self.temperature).unsqueeze(1)
        return logits

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "temperature": self.temperature,
            "selective_temperature": self.selective_temperature,
            "fit": dict(self.fit),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        """Read a ``calibration`` entry; one with only ``temperature`` (older bundles) still loads."""
        unknown = set(d) - {"method", "temperature", "selective_temperature", "fit"}
        if unknown:
            raise ValueError(f"unknown calibration keys: {sorted(unknown)}")
        return cls(
            temperature=float(d.get("temperature", 1.0)),
            method=d.get("method"),
            selective_temperature=float(d.get("selective_temperature", 1.0)),
            fit=dict(d.get("fit") or {}),
        )
