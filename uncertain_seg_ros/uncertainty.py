"""Per-pixel uncertainty in [0, 1] from calibrated probabilities or from the learned loss predictor.

Higher means "more likely misclassified". All three sources are monotone scores, so ranking metrics
(AUROC, AUPR, F0.5) compare them fairly; the bundle says which one the node publishes.
"""
import math

import torch

UNCERTAINTY_SOURCES = ("max_softmax", "entropy", "learned")


def max_softmax_uncertainty(probs: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``1 - max_k p_k``: the confidence-based uncertainty of gamma-SSL."""
    return 1.0 - probs.amax(dim=dim)


def entropy_uncertainty(probs: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Shannon entropy of the class distribution, divided by ``log K`` so that it lies in [0, 1]."""
    k = probs.shape[dim]
    ent = -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=dim)
    return (ent / math.log(k)).clamp(0.0, 1.0)


def learned_uncertainty(predicted_loss: torch.Tensor) -> torch.Tensor:
    """Map the uncertainty head's predicted loss (>= 0) monotonically to [0, 1): ``1 - exp(-l)``."""
    return -torch.expm1(-predicted_loss.clamp_min(0.0))


def uncertainty(source: str, probs: torch.Tensor, predicted_loss: torch.Tensor | None = None) -> torch.Tensor:
    """Uncertainty map (B, H, W) of the named source from probs (B, K, H, W) and predicted loss (B, H, W)."""
    if source == "max_softmax":
        return max_softmax_uncertainty(probs)
    if source == "entropy":
        return entropy_uncertainty(probs)
    if source == "learned":
        if predicted_loss is None:
            raise ValueError("the 'learned' uncertainty needs the uncertainty head's predicted loss")
        return learned_uncertainty(predicted_loss)
    raise ValueError(f"unknown uncertainty source {source!r}; choose one of {UNCERTAINTY_SOURCES}")
