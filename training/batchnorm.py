"""BatchNorm re-estimation on target frames: the standing baseline for adaptation without training.

Replaces every BatchNorm's running mean and variance by the exact statistics of its inputs over the
given batches (AdaBN, Li et al. 2016), and changes nothing else. The statistics are accumulated in
float64 from forward hooks while the model runs in eval mode (no drop-path, and each BatchNorm
normalises with its old statistics, so a BatchNorm that feeds another would see its input under
the old ones; the segmenter has a single BatchNorm, the head's, fed by the backbone's features).
"""
from collections.abc import Iterable

import torch
from torch import nn


class _Moments:
    """Per-channel count, sum and sum of squares of a BatchNorm's inputs (N, C, ...)."""

    def __init__(self, channels: int) -> None:
        self.count = 0
        self.sum = torch.zeros(channels, dtype=torch.float64)
        self.sum_sq = torch.zeros(channels, dtype=torch.float64)

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].detach().transpose(0, 1).reshape(inputs[0].shape[1], -1).to(torch.float64).cpu()
        self.count += x.shape[1]
        self.sum += x.sum(dim=1)
        self.sum_sq += (x * x).sum(dim=1)

    def mean_var(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and unbiased variance, as BatchNorm keeps its running variance."""
        mean = self.sum / self.count
        var = (self.sum_sq - self.count * mean * mean) / max(1, self.count - 1)
        return mean, var.clamp_min(0.0)


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Set every BatchNorm's running statistics to those of its inputs over ``batches`` (model inputs).

    Returns the number of input values per channel each BatchNorm saw (of the first BatchNorm). The
    model is left in eval mode; ``num_batches_tracked`` counts the batches.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        raise ValueError("the model has no BatchNorm with running statistics to re-estimate")
    moments = [_Moments(m.num_features) for m in norms]
    hooks = [m.register_forward_pre_hook(acc) for m, acc in zip(norms, moments)]
    model.eval()
    batches_seen = 0
    try:
        for x in batches:
            model(x)
            batches_seen += 1
    finally:
        for h in hooks:
            h.remove()
    if batches_seen == 0:
        raise ValueError("no batches to re-estimate the BatchNorm statistics on")
    for m, acc in zip(norms, moments):
        mean, var = acc.mean_var()
        m.running_mean.copy_(mean.to(m.running_mean))
        m.running_var.copy_(var.to(m.running_var))
        m.num_batches_tracked.fill_(batches_seen)
    return moments[0].count
