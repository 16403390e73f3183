"""From network outputs at patch resolution to what a robot uses: labels, confidence, uncertainty, mask.

One function serves the node, the evaluator and the demo, so that what is measured is what is
published. It runs on whatever device the tensors are on.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .calibration import Calibration
from .uncertainty import UNCERTAINTY_SOURCES, uncertainty


@dataclass
class Prediction:
    """Per-pixel results at the requested output size, batched (B, H, W)."""

    labels: torch.Tensor
    confidence: torch.Tensor
    uncertainty: torch.Tensor
    mask: torch.Tensor
    probs: torch.Tensor
    predicted_loss: torch.Tensor
    nonfinite: torch.Tensor | None = None
    """(B,) int64: pixels per frame whose network outputs were not finite (see :func:`fail_closed`)."""


def upsample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (B, C, h, w) maps to ``size`` = (H, W); no-op when already there."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def decode(
    logits: torch.Tensor,
    predicted_loss: torch.Tensor,
    size: tuple[int, int],
    calibration: Calibration,
    source: str,
    mask_threshold: float,
    *,
    selector: torch.nn.Module | None = None,
) -> Prediction:
    """Upsample logits and predicted loss to ``size``, calibrate, and derive every per-pixel output.

    ``selector`` is the model's misprediction selector (``model.selector``), needed by selective
    scaling; it runs on the upsampled logits, as it was fitted, so per pixel of the output. The
    misclassification mask is ``uncertainty > mask_threshold`` of the chosen ``source``, computed
    from the calibrated probabilities.
    """
    if source not in UNCERTAINTY_SOURCES:
        raise ValueError(f"unknown uncertainty source {source!r}; choose one of {UNCERTAINTY_SOURCES}")
    logits = calibration.apply(upsample(logits.float(), size), selector)
    probs = logits.softmax(dim=1)
    confidence, labels = probs.max(dim=1)
    loss = upsample(predicted_loss.float(), size)[:, 0]
    unc = uncertainty(source, probs, loss)
    return fail_closed(Prediction(labels, confidence, unc, unc > mask_threshold, probs, loss))


def fail_closed(pred: Prediction) -> Prediction:
    """Pixels whose confidence or uncertainty is not finite (the network gave NaN or inf) become
    uncertain: uncertainty 1, confidence 0, mask on. Counted per frame in ``pred.nonfinite``.

    NaN compares false with every threshold, so without this step a broken network would publish
    class 0 as *certain* everywhere. The step is separate from :func:`decode`'s maths on purpose:
    whatever computes the maps, this runs last.
    """
    bad = ~(torch.isfinite(pred.uncertainty) & torch.isfinite(pred.confidence))
    pred.uncertainty = pred.uncertainty.masked_fill(bad, 1.0)
    pred.confidence = pred.confidence.masked_fill(bad, 0.0)
    pred.mask = pred.mask | bad
    pred.nonfinite = bad.flatten(1).sum(dim=1)
    return pred
