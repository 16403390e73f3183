"""Augmentations for driving images: random scale, crop, horizontal flip and colour jitter.

Each sample's randomness comes from a generator seeded by (seed, epoch, index), so a run resumed
from a checkpoint sees exactly the batches it would have seen, whatever the worker count.
"""
from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class AugmentConfig:
    scale_min: float = 0.6
    scale_max: float = 1.6
    hflip: bool = True
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3


def _resize(image: np.ndarray, label: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    h, w = label.shape
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, size, interpolation=interp), cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)


def colour_jitter(image: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """Random brightness, contrast and saturation (uint8 RGB in and out)."""
    x = image.astype(np.float32)
    x *= 1.0 + rng.uniform(-cfg.brightness, cfg.brightness)
    mean = x.mean()
    x = (x - mean) * (1.0 + rng.uniform(-cfg.contrast, cfg.contrast)) + mean
    grey = x.mean(axis=2, keepdims=True)
    x = (x - grey) * (1.0 + rng.uniform(-cfg.saturation, cfg.saturation)) + grey
    return np.ascontiguousarray(np.clip(x, 0, 255).astype(np.uint8))


def geometric_transform(
    image: np.ndarray,
    label: np.ndarray,
    size: tuple[int, int],
    rng: np.random.Generator,
    cfg: AugmentConfig,
    ignore_index: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Random-scale (relative to fitting the image height to ``size``), crop to ``size``, flip."""
    H, W = size
    scale = H / label.shape[0] * rng.uniform(cfg.scale_min, cfg.scale_max)
    image, label = _resize(image, label.astype(np.int32), scale)
    ph, pw = max(0, H - label.shape[0]), max(0, W - label.shape[1])
    if ph or pw:
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)))
        label = np.pad(label, ((0, ph), (0, pw)), constant_values=ignore_index)
    y = int(rng.integers(0, label.shape[0] - H + 1))
    x = int(rng.integers(0, label.shape[1] - W + 1))
    image, label = image[y : y + H, x : x + W], label[y : y + H, x : x + W]
    if cfg.hflip and rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(label.astype(np.int64))


def train_transform(
    image: np.ndarray,
    label: np.ndarray,
    size: tuple[int, int],
    rng: np.random.Generator,
    cfg: AugmentConfig,
    ignore_index: int,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`geometric_transform`, then :func:`colour_jitter`, from one generator."""
    image, label = geometric_transform(image, label, size, rng, cfg, ignore_index)
    return colour_jitter(image, rng, cfg), label


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one sample's augmentation in one epoch."""
    return np.random.default_rng([seed, epoch, index])
