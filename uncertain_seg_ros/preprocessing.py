"""Camera image -> network input, on whatever device the image tensor is on."""
import torch
import torch.nn.functional as F


def to_input(
    images: torch.Tensor,
    size: tuple[int, int],
    mean: tuple[float, float, float] | torch.Tensor,
    std: tuple[float, float, float] | torch.Tensor,
) -> torch.Tensor:
    """uint8 RGB images (B, H, W, 3) -> normalised float (B, 3, size[0], size[1]).

    Resizing is bilinear with antialiasing, so downscaled camera frames do not alias. ``mean`` and
    ``std`` may be float32 tensors already on the images' device (no host-to-device copy per call).
    The result is contiguous NCHW whatever the layout of the resize (one allocation for the
    normalisation), the layout compiled backends were built for.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 (B, H, W, 3) RGB images, got {tuple(images.shape)} {images.dtype}")
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    m = torch.as_tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.as_tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return torch.sub(x, m, out=out).div_(s)
