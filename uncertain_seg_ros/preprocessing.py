"""Camera image -> network input, on whatever device the image tensor is on."""
import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F


def reduced_size(height: int, width: int, max_pixels: int) -> tuple[int, int]:
    """The largest (height, width) with the same aspect ratio and at most ``max_pixels`` pixels.

    Sides are scaled by the same factor and rounded down (at least 1); a frame within the limit
    keeps its size.
    """
    if height * width <= max_pixels:
        return height, width
    scale = math.sqrt(max_pixels / (height * width))
    h, w = max(1, int(height * scale)), max(1, int(width * scale))
    while h * w > max_pixels:  # rounding of a 1-pixel side can overshoot
        h, w = (h - 1, w) if h >= w else (h, w - 1)
    return h, w


def fit_pixels(image: np.ndarray, max_pixels: int | None) -> np.ndarray:
    """``image`` (H, W[, C]) uint8, shrunk with area averaging to :func:`reduced_size` when it has more
    than ``max_pixels`` pixels; otherwise ``image`` itself. Bounds what is computed per output pixel."""
    if max_pixels is None or image.shape[0] * image.shape[1] <= max_pixels:
        return image
    h, w = reduced_size(image.shape[0], image.shape[1], max_pixels)
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)


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
