"""The RViz overlay: the camera image blended with the class colours, uncertain pixels marked."""
import torch

MARK_COLOR = (255, 0, 255)
MARKING = "masked pixels half-blended with the mark colour"
"""How :func:`overlay` marks the mask, in words (the node's class_info says it)."""


def overlay(
    image: torch.Tensor,
    labels_rgb: torch.Tensor,
    mask: torch.Tensor,
    alpha: float = 0.5,
    mark_color: tuple[int, int, int] | torch.Tensor = MARK_COLOR,
) -> torch.Tensor:
    """(H, W, 3) uint8: ``(1 - alpha) * image + alpha * labels_rgb``, masked pixels half-blended with ``mark_color``.

    Everything stays on the tensors' device; only the result is downloaded by the caller. Pass
    ``mark_color`` as a float32 tensor on that device to avoid a host-to-device copy per call.
    The mark is blended in as ``out + w * (mark - out)`` with ``w`` 0.5 on masked pixels, 0 elsewhere:
    the same bytes as selecting between the two blends, without ``torch.where`` broadcasting the
    (H, W) mask over the colour channels (about half the time on a 2-thread CPU).
    """
    out = image.float() * (1.0 - alpha) + labels_rgb.float() * alpha
    mark = torch.as_tensor(mark_color, dtype=out.dtype, device=out.device)
    out.addcmul_(mask.unsqueeze(-1).to(out.dtype).mul_(0.5), mark - out)
    return out.round_().clamp_(0, 255).to(torch.uint8)
