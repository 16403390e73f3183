"""Training losses: ignore-aware (optionally class-balanced) cross-entropy and the uncertainty ranking loss."""
import numpy as np
import torch
import torch.nn.functional as F

CLASS_WEIGHTINGS = ("none", "inverse_sqrt", "median_frequency")


def class_weights(frequencies: np.ndarray, scheme: str) -> torch.Tensor | None:
    """Per-class CE weights from pixel counts; classes never seen get weight 0, weights average to 1."""
    if scheme == "none":
        return None
    freq = frequencies.astype(np.float64) / max(1, frequencies.sum())
    seen = freq > 0
    w = np.zeros_like(freq)
    if scheme == "inverse_sqrt":
        w[seen] = 1.0 / np.sqrt(freq[seen])
    elif scheme == "median_frequency":
        w[seen] = np.median(freq[seen]) / freq[seen]
    else:
        raise ValueError(f"unknown class weighting {scheme!r}; choose one of {CLASS_WEIGHTINGS}")
    w[seen] /= w[seen].mean()
    return torch.tensor(w, dtype=torch.float32)


def ranking_loss(
    predicted: torch.Tensor,
    actual: torch.Tensor,
    valid: torch.Tensor,
    pairs: int = 4096,
    margin: float = 0.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pairwise ranking of per-pixel losses (Pretrained Visual Uncertainties, Kirchhof et al. 2024).

    ``mean max(0, -sign(l_i - l_j) * (u_i - u_j) + margin)`` over ``pairs`` random pairs of valid
    pixels: the predicted uncertainty ``u`` only has to order pixels like their actual loss ``l``.
    """
    u = predicted[valid]
    l = actual.detach()[valid]
    n = u.numel()
    if n < 2:
        return predicted.sum() * 0.0
    idx = torch.randint(0, n, (2, pairs), device=u.device, generator=generator)
    sign = torch.sign(l[idx[0]] - l[idx[1]])
    return F.relu(-sign * (u[idx[0]] - u[idx[1]]) + margin).mean()
