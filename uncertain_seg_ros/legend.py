"""The key to the pictures: a class-colour legend, an uncertainty colour bar and the overlay's marking.

Drawn with OpenCV on a white strip as wide as the picture it goes under (montages append it below
their rows), so the core needs no matplotlib. ``python -m uncertain_seg_ros.legend --bundle NAME
--out legend.png`` writes one for a bundle (the README's picture is made so).
"""
import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from .colormap import colorize_scalar
from .overlay import overlay

FONT = cv2.FONT_HERSHEY_SIMPLEX
FONT_SCALE = 0.45
TEXT = (0, 0, 0)
BACKGROUND = 255
MARGIN = 8
"""Blank pixels left of, right of and above every line of the legend."""
SWATCH = 16
ITEM_GAP = 14
LINE_HEIGHT = 24
"""Height of one line of class swatches, of the colour bar's title and of the overlay key."""
BAR_HEIGHT = 14
BAR_MAX_LENGTH = 512
TICKS = (0.0, 0.25, 0.5, 0.75, 1.0)
TICK_LABELS = {0.0: "0", 0.5: "0.5", 1.0: "1"}
BAR_TITLE = "uncertainty (higher = more likely wrong)"
SWATCH_BORDER = (90, 90, 90)


def _text_width(text: str) -> int:
    return cv2.getTextSize(text, FONT, FONT_SCALE, 1)[0][0]


def _put(canvas: np.ndarray, text: str, x: int, baseline: int) -> None:
    cv2.putText(canvas, text, (int(x), int(baseline)), FONT, FONT_SCALE, TEXT, 1, cv2.LINE_AA)


def _blank(height: int, width: int) -> np.ndarray:
    return np.full((height, width, 3), BACKGROUND, dtype=np.uint8)


def swatch_layout(labels: Sequence[str], width: int) -> tuple[list[tuple[int, int]], int]:
    """Top-left corners of the swatches of ``labels`` in a strip ``width`` wide, and the strip's height.

    The strip starts with ``classes:``; an item (swatch, then its label) that would cross the right
    margin starts a new line.
    """
    x = MARGIN + _text_width("classes:") + ITEM_GAP
    line = 0
    corners = []
    for text in labels:
        item = SWATCH + 4 + _text_width(text)
        if x + item > width - MARGIN and x > MARGIN:
            line, x = line + 1, MARGIN
        corners.append((x, MARGIN + line * LINE_HEIGHT + (LINE_HEIGHT - SWATCH) // 2))
        x += item + ITEM_GAP
    return corners, MARGIN + (line + 1) * LINE_HEIGHT if labels else 0


def class_items(class_names: Sequence[str], palette: np.ndarray) -> list[tuple[str, tuple[int, int, int]]]:
    """``("<id> <name>", colour)`` for every class of a palette (names beyond the list: ``class <id>``)."""
    palette = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    names = list(class_names) + [f"class {i}" for i in range(len(class_names), len(palette))]
    return [(f"{i} {names[i]}", tuple(int(v) for v in palette[i])) for i in range(len(palette))]


def class_legend(items: Sequence[tuple[str, tuple[int, int, int]]], width: int) -> np.ndarray:
    """RGB strip ``width`` wide: ``classes:`` then a swatch of each item's colour and its label, wrapped."""
    corners, height = swatch_layout([text for text, _ in items], width)
    canvas = _blank(height, width)
    if not items:
        return canvas
    _put(canvas, "classes:", MARGIN, MARGIN + LINE_HEIGHT // 2 + 5)
    for (text, colour), (x, y) in zip(items, corners):
        canvas[y : y + SWATCH, x : x + SWATCH] = colour
        cv2.rectangle(canvas, (x - 1, y - 1), (x + SWATCH, y + SWATCH), SWATCH_BORDER, 1)
        _put(canvas, text, x + SWATCH + 4, y + SWATCH - 3)
    return canvas


def bar_span(width: int) -> tuple[int, int]:
    """First and last column of the colour bar in a strip ``width`` wide (values 0 and 1)."""
    length = max(2, min(BAR_MAX_LENGTH, width - 2 * MARGIN - 1))
    return MARGIN, MARGIN + length - 1


BAR_TOP = MARGIN + LINE_HEIGHT
"""First row of the colour bar in its strip (the title line is above it)."""


def colour_bar(width: int, colormap: str = "inferno", threshold: float | None = None) -> np.ndarray:
    """RGB strip ``width`` wide: the title, the colour map from 0 (left) to 1 (right), ticks below.

    Column ``x0 + i`` of the bar shows value ``i / (x1 - x0)`` as :func:`colorize_scalar` colours
    it (:func:`bar_span` gives x0, x1). ``threshold`` (the mask's) is a white line across the bar,
    named in the title.
    """
    x0, x1 = bar_span(width)
    height = BAR_TOP + BAR_HEIGHT + 6 + LINE_HEIGHT - 4
    canvas = _blank(height, width)
    title = f"{BAR_TITLE}, colour map {colormap}"
    if threshold is not None:
        title += f"; white line: mask threshold {threshold:.3f}"
    _put(canvas, title, MARGIN, BAR_TOP - 8)
    values = np.linspace(0.0, 1.0, x1 - x0 + 1, dtype=np.float64)
    canvas[BAR_TOP : BAR_TOP + BAR_HEIGHT, x0 : x1 + 1] = colorize_scalar(values, colormap)[None]
    bottom = BAR_TOP + BAR_HEIGHT
    for v in TICKS:
        x = x0 + round(v * (x1 - x0))
        cv2.line(canvas, (x, bottom), (x, bottom + (5 if v in TICK_LABELS else 3)), TEXT, 1)
        if v in TICK_LABELS:
            label = TICK_LABELS[v]
            left = int(np.clip(x - _text_width(label) // 2, 0, width - _text_width(label)))
            _put(canvas, label, left, bottom + 6 + 14)
    if threshold is not None:
        x = x0 + round(float(np.clip(threshold, 0.0, 1.0)) * (x1 - x0))
        cv2.line(canvas, (x, BAR_TOP - 3), (x, bottom + 2), TEXT, 3)
        cv2.line(canvas, (x, BAR_TOP - 2), (x, bottom + 1), (255, 255, 255), 1)
    return canvas


def mark_sample(height: int = 18, width: int = 44) -> np.ndarray:
    """A grey patch with a masked rectangle inside, through :func:`overlay` itself: what the mark looks like."""
    grey = torch.full((height, width, 3), 170, dtype=torch.uint8)
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[2:-2, 4:-4] = True
    return overlay(grey, grey, mask).numpy()


def overlay_key(width: int, threshold: float | None = None) -> np.ndarray:
    """RGB strip: a sample of the overlay's marking and what it means."""
    canvas = _blank(MARGIN + LINE_HEIGHT, width)
    sample = mark_sample()
    y = MARGIN + (LINE_HEIGHT - sample.shape[0]) // 2
    canvas[y : y + sample.shape[0], MARGIN : MARGIN + sample.shape[1]] = sample
    where = f"uncertainty > {threshold:.3f}" if threshold is not None else "uncertainty above the mask threshold"
    _put(canvas, f"overlay: magenta outline + hatch = mask ({where})",
         MARGIN + sample.shape[1] + 6, MARGIN + LINE_HEIGHT // 2 + 5)
    return canvas


def note_lines(notes: Sequence[str], width: int) -> np.ndarray:
    canvas = _blank(MARGIN + LINE_HEIGHT * len(notes), width)
    for i, note in enumerate(notes):
        _put(canvas, note, MARGIN, MARGIN + i * LINE_HEIGHT + LINE_HEIGHT // 2 + 5)
    return canvas


@dataclass(eq=False)
class Legend:
    """What a picture's legend shows; :meth:`render` draws it, :meth:`below` appends it to a picture.

    ``palette`` (K, 3) uint8 and ``class_names`` give the class swatches (none without a palette);
    ``extra_items`` more ``(label, colour)`` swatches (e.g. void); ``colormap`` the colour bar (none
    if None) with ``threshold`` marked on it; ``overlay_key`` a sample of the overlay's marking;
    ``notes`` lines of text at the end.
    """

    class_names: Sequence[str] = ()
    palette: np.ndarray | None = None
    colormap: str | None = "inferno"
    threshold: float | None = None
    overlay_key: bool = False
    extra_items: Sequence[tuple[str, tuple[int, int, int]]] = ()
    notes: Sequence[str] = field(default_factory=tuple)

    @classmethod
    def for_bundle(cls, config, **kwargs) -> "Legend":
        """The legend of a bundle's outputs: its classes and palette, its mask threshold (overridable)."""
        kwargs.setdefault("threshold", config.mask_threshold)
        return cls(class_names=config.class_names, palette=config.palette, **kwargs)

    def items(self) -> list[tuple[str, tuple[int, int, int]]]:
        """The swatches, in order: the classes, then ``extra_items``."""
        classes = class_items(self.class_names, self.palette) if self.palette is not None else []
        return classes + [(text, tuple(int(v) for v in colour)) for text, colour in self.extra_items]

    def render(self, width: int) -> np.ndarray:
        """(H, width, 3) uint8 RGB, white background: swatches, colour bar, overlay key, notes, a margin."""
        parts = []
        if self.items():
            parts.append(class_legend(self.items(), width))
        if self.colormap is not None:
            parts.append(colour_bar(width, self.colormap, self.threshold))
        if self.overlay_key:
            parts.append(overlay_key(width, self.threshold))
        if self.notes:
            parts.append(note_lines(self.notes, width))
        parts.append(_blank(MARGIN, width))
        return np.concatenate(parts, axis=0)

    def below(self, image: np.ndarray) -> np.ndarray:
        """``image`` (H, W, 3) uint8 RGB with the legend, as wide as it, appended under it."""
        return np.concatenate([image, self.render(image.shape[1])], axis=0)

    def markdown(self) -> str:
        """One line of Markdown naming every swatch's colour and the colour map's reading."""
        parts = []
        if self.items():
            parts.append("Classes (id, name, colour): " + ", ".join(
                f"{text} `#{r:02x}{g:02x}{b:02x}`" for text, (r, g, b) in self.items()) + ".")
        if self.colormap is not None:
            where = f"; mask threshold {self.threshold:.3f}" if self.threshold is not None else ""
            parts.append(f"Uncertainty through `{self.colormap}`: dark = 0 (certain), bright = 1 (most likely wrong){where}.")
        return " ".join(parts)


def write_png(path: Path, image: np.ndarray) -> Path:
    ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding of the legend failed")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.tobytes())
    return path


def main(argv: list[str] | None = None) -> int:
    from .bundle import read_config
    from .colormap import COLORMAPS
    from .resources import resolve_bundle

    parser = argparse.ArgumentParser(
        prog="python -m uncertain_seg_ros.legend",
        description="Write the legend of a bundle's outputs as a PNG: class colours, the uncertainty colour "
                    "bar and the overlay's marking (the README's legend is made with this).")
    parser.add_argument("--bundle", default="camvid_demo", help="bundle folder or shipped name (default: camvid_demo)")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--width", type=int, default=760, help="width in pixels (default: 760)")
    parser.add_argument("--colormap", default="inferno", choices=COLORMAPS, help="the node's colormap (default: inferno)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="mask threshold to mark on the bar (default: none marked; the bundle's is per bundle)")
    args = parser.parse_args(argv)
    config = read_config(resolve_bundle(args.bundle))
    legend = Legend.for_bundle(config, colormap=args.colormap, threshold=args.threshold, overlay_key=True)
    print(write_png(Path(args.out), legend.render(args.width)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
