"""A documented photometric "dusk" transform: day frames made dark, blue and noisy, deterministically.

It makes a second, larger labelled target from labelled day frames (the labels do not change), for
more statistical power than the 31 labelled real dusk frames. Per pixel, with ``x`` in [0, 1]:

    y = gain * x ** gamma * white_balance[channel] + N(0, noise_sigma^2)      (then clipped, rounded)

- ``gamma`` > 1 darkens mid-tones more than highlights, as dusk exposure does;
- ``gain`` scales what is left (the brightest pixels end at about ``gain`` of full scale);
- ``white_balance`` shifts the colour temperature (less red, more blue: a blue hour);
- Gaussian sensor noise, independent per pixel and channel, from ``numpy.random.default_rng(seed)``.

The defaults were read off CamVid's own frames, unlabelled ones only (no label was looked at):
day/test has mean RGB (112, 113, 113), median luminance 87 and 95th percentile 255; the dusk drive
(dusk/unlabeled) has mean (53, 62, 66), median 32 and 95th percentile 185. ``gain = 0.72`` puts
the highlights at 185; ``gamma = 1.6`` then puts the median near 32; ``white_balance`` is the dusk
frames' R/G and B/G ratios (0.86, 1.06) over the day frames' (1.00, 1.01). On day/test the result has
mean RGB about (51, 60, 63), median luminance 32, 95th percentile 179 (the test checks the direction of every change, not these figures).
"""
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DuskParams:
    """Parameters of :func:`dusk_transform` (defaults: CamVid day -> dusk, see the module docstring)."""

    gamma: float = 1.6
    gain: float = 0.72
    white_balance: tuple[float, float, float] = (0.86, 1.0, 1.05)
    noise_sigma: float = 3.0  # in 8-bit grey levels

    def __post_init__(self) -> None:
        if self.gamma <= 0 or self.gain <= 0 or min(self.white_balance) <= 0 or self.noise_sigma < 0:
            raise ValueError(f"dusk parameters must be positive (noise_sigma >= 0), got {self}")


def dusk_transform(image: np.ndarray, seed: int | list[int], params: DuskParams = DuskParams()) -> np.ndarray:
    """The dusk version of a uint8 RGB image (H, W, 3); the same ``seed`` gives the same noise."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) RGB image, got {image.shape} {image.dtype}")
    x = image.astype(np.float32) / 255.0
    y = params.gain * np.power(x, params.gamma) * np.asarray(params.white_balance, dtype=np.float32)
    y = y * 255.0
    if params.noise_sigma > 0:
        y += np.random.default_rng(seed).normal(0.0, params.noise_sigma, size=y.shape).astype(np.float32)
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)
