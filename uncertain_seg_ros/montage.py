"""Grids of images with column titles and row names, written as one PNG a person looks at."""
import cv2
import numpy as np

MAX_WIDTH = 1980
MIN_TILE_WIDTH = 160
GAP = 4
HEADER_HEIGHT = 30
NAME_HEIGHT = 22
BACKGROUND = 255


def tile_width(columns: int, widest: int | None = None, max_width: int = MAX_WIDTH) -> int:
    """Tile width that fits ``columns`` tiles in ``max_width``; native width ``widest`` where it fits."""
    width = (max_width - (columns + 1) * GAP) // columns
    return width if widest is None else int(np.clip(widest, MIN_TILE_WIDTH, width))


def fit(image: np.ndarray, width: int, nearest: bool = False) -> np.ndarray:
    """``image`` as RGB uint8 resized to ``width`` keeping its aspect (nearest for label-like images)."""
    image = np.asarray(image, dtype=np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    h, w = image.shape[:2]
    size = (width, max(1, round(width * h / w)))
    return cv2.resize(image, size, interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_AREA)


def _text_band(width: int, height: int, texts: list[tuple[int, str]], scale: float = 0.5) -> np.ndarray:
    band = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
    for x, text in texts:
        cv2.putText(band, text, (x + 2, height - 8), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return band


def image_grid(columns: list[str], rows: list[tuple[str, list[np.ndarray]]], width: int) -> np.ndarray:
    """RGB uint8 grid: ``columns`` titles on top, then per row its name and its tiles (each ``width`` wide).

    Tiles of one row must share a height (use :func:`fit`).
    """
    total = len(columns) * width + (len(columns) + 1) * GAP
    parts = [_text_band(total, HEADER_HEIGHT, [(GAP + i * (width + GAP), c) for i, c in enumerate(columns)])]
    if not rows:
        parts.append(_text_band(total, NAME_HEIGHT, [(GAP, "(no examples)")], scale=0.45))
    for name, tiles in rows:
        if len(tiles) != len(columns):
            raise ValueError(f"row {name!r} has {len(tiles)} tiles for {len(columns)} columns")
        gap = np.full((tiles[0].shape[0], GAP, 3), BACKGROUND, dtype=np.uint8)
        strip = [gap]
        for tile in tiles:
            strip += [tile, gap]
        parts.append(_text_band(total, NAME_HEIGHT, [(GAP, name)], scale=0.45))
        parts.append(np.concatenate(strip, axis=1))
    parts.append(np.full((GAP, total, 3), BACKGROUND, dtype=np.uint8))
    return np.concatenate(parts, axis=0)
