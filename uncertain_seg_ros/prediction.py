"""From network outputs at patch resolution to what a robot uses: labels, confidence, uncertainty, mask.

One function serves the node, the evaluator and the demo, so that what is measured is what is
published. It runs on whatever device the tensors are on.

Every output is computed where its information lives. Labels, calibrated probabilities,
uncertainty and mask are per-pixel functions of the bilinearly upsampled logits and change sharply
along class boundaries (where two classes' logits cross, the confidence dips), so they are computed
per pixel of the output. The selective scaler's selector (an MLP per pixel) only switches a pixel's
temperature, so it runs on ``SELECTOR_GRID_SCALE`` times the network's grid and its score is
upsampled. ``benchmarks/decode_resolution.py`` measures both choices on CamVid
(``benchmarks/results/decode_resolution.md``): computing the probabilities on the network's grid
and upsampling the maps instead lowers the demo bundle's AUROC by 0.017 and AUPR by 0.037 on
day/test; the selector on every pixel makes a 480x360 decode about four times slower.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .calibration import Calibration
from .uncertainty import UNCERTAINTY_SOURCES, uncertainty

# Selector samples per patch side. Against the selector on every pixel (CamVid day/test and
# dusk/test, demo bundle): masks equal on 99.0% of pixels at 1, 99.5% at 2, 99.85% at 4 and 99.96%
# at 8, labels on all; AUROC, AUPR and ECE within 2e-4 at 4, for 6 ms of decode instead of 22.
SELECTOR_GRID_SCALE = 4


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


def selector_flags(selector: torch.nn.Module, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Boolean (B, H, W) at ``size``: pixels the selector takes for mispredictions, from grid logits (B, K, h, w).

    The selector scores the logits upsampled to ``SELECTOR_GRID_SCALE`` times the grid (at most
    ``size``); its scores are upsampled to ``size`` and a pixel is flagged where the score is > 0
    (sigmoid > 0.5), as when fitting.
    """
    h, w = logits.shape[-2:]
    grid = (min(size[0], h * SELECTOR_GRID_SCALE), min(size[1], w * SELECTOR_GRID_SCALE))
    return upsample(selector(upsample(logits, grid)), size)[:, 0] > 0


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
    scaling (see :func:`selector_flags`). The misclassification mask is ``uncertainty >
    mask_threshold`` of the chosen ``source``, computed from the calibrated probabilities.
    """
    if source not in UNCERTAINTY_SOURCES:
        raise ValueError(f"unknown uncertainty source {source!r}; choose one of {UNCERTAINTY_SOURCES}")
    logits = logits.float()
    flagged = selector_flags(selector, logits, size) if calibration.needs_selector and selector is not None else None
    probs = calibration.apply(upsample(logits, size), flagged).softmax(dim=1)
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
