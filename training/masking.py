"""Random patch masks: which 14x14 patches the backbone sees as ``mask_token`` instead of the image.

Used by supervised training (random masking, so that the mask token and the network learn what a
masked patch is, as DINOv2's masked-image-modelling pretraining leaves them) and by adaptation
(the gamma-SSL query and the masked pseudo-label student). Masks come from their own generator,
seeded by (seed, step), so they do not depend on what else drew random numbers before them and a
resumed run draws the same masks.
"""
import torch


def mask_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of one step's masks."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def random_patch_mask(
    batch: int,
    grid: tuple[int, int],
    ratio: float | torch.Tensor,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, h*w) bool with ``round(ratio * h*w)`` randomly chosen patches True per image.

    ``ratio`` is one fraction for the whole batch or a (B,) tensor of fractions, one per image.
    Drawn on the CPU (from ``generator`` when given) and moved to ``device``.
    """
    n = grid[0] * grid[1]
    ratios = torch.as_tensor(ratio, dtype=torch.float64).expand(batch)
    if bool(((ratios < 0) | (ratios > 1)).any()):
        raise ValueError(f"mask ratios must lie in [0, 1], got {ratios.tolist()}")
    k = torch.round(ratios * n).long()
    order = torch.rand(batch, n, generator=generator).argsort(dim=1)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n).expand(batch, n).contiguous())
    return (rank < k[:, None]).to(device)


def random_ratio_mask(
    batch: int, grid: tuple[int, int], max_ratio: float, device: torch.device, generator: torch.Generator
) -> torch.Tensor:
    """Masks whose ratio is drawn per image uniformly from [0, ``max_ratio``] (random masking in training)."""
    ratios = torch.rand(batch, generator=generator, dtype=torch.float64) * max_ratio
    return random_patch_mask(batch, grid, ratios, device, generator)
