"""The legend under the montages: class swatches, the uncertainty colour bar, the overlay key.

Swatches and the bar are filled rectangles (no anti-aliasing), so their pixels are compared exactly:
a swatch's centre is its class's palette colour, a bar column is the colour map's value there. Only
the text is anti-aliased, and no test reads it.
"""
import cv2
import numpy as np
import pytest

from uncertain_seg_ros.bundle import read_config
from uncertain_seg_ros.colormap import COLORMAPS, colorize_scalar, lut
from uncertain_seg_ros.legend import (
    BAR_HEIGHT,
    BAR_TOP,
    SWATCH,
    Legend,
    bar_span,
    class_items,
    class_legend,
    colour_bar,
    mark_sample,
    swatch_layout,
)
from uncertain_seg_ros.overlay import MARK_COLOR

from conftest import REPO

NAMES = ["sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car", "pedestrian", "bicyclist"]
PALETTE = np.array(read_config(REPO / "models" / "camvid_demo").palette)


def _centres(labels, width):
    corners, _ = swatch_layout(labels, width)
    return [(y + SWATCH // 2, x + SWATCH // 2) for x, y in corners]


@pytest.mark.parametrize("width", [1980, 760, 300])
def test_one_swatch_per_class_with_its_palette_colour_at_the_centre(width):
    items = class_items(NAMES, PALETTE)
    strip = class_legend(items, width)
    assert strip.shape[1] == width and strip.dtype == np.uint8
    centres = _centres([text for text, _ in items], width)
    assert len(centres) == len(NAMES) == len(set(centres))
    for (y, x), colour in zip(centres, PALETTE):
        assert 0 <= x < width and 0 <= y < strip.shape[0]
        assert strip[y, x].tolist() == colour.tolist()
    lines = len({y for y, _ in centres})
    assert lines == 1 if width == 1980 else lines > 1  # wrapped to the width when it does not fit


def test_class_items_name_every_palette_entry():
    assert class_items(["a"], PALETTE[:2]) == [("0 a", tuple(PALETTE[0].tolist())), ("1 class 1", tuple(PALETTE[1].tolist()))]


@pytest.mark.parametrize("name", COLORMAPS)
@pytest.mark.parametrize("width", [1980, 400])
def test_colour_bar_runs_from_the_colour_map_at_0_to_its_value_at_1(name, width):
    bar = colour_bar(width, name)
    x0, x1 = bar_span(width)
    row = bar[BAR_TOP + BAR_HEIGHT // 2]
    assert row[x0].tolist() == lut(name)[0].tolist() == colorize_scalar(np.float32(0.0), name).tolist()
    assert row[x1].tolist() == lut(name)[255].tolist() == colorize_scalar(np.float32(1.0), name).tolist()
    assert row[(x0 + x1) // 2].tolist() == colorize_scalar(((x1 - x0) // 2) / (x1 - x0), name).tolist()
    assert (bar[BAR_TOP : BAR_TOP + BAR_HEIGHT, x0 : x1 + 1] == row[None, x0 : x1 + 1]).all()  # every bar row alike
    assert x1 < width


def test_threshold_is_a_white_line_across_the_bar_and_the_ends_stay():
    width = 760
    x0, x1 = bar_span(width)
    bar = colour_bar(width, "inferno", threshold=0.3)
    x = x0 + round(0.3 * (x1 - x0))
    assert (bar[BAR_TOP : BAR_TOP + BAR_HEIGHT, x] == 255).all()
    row = bar[BAR_TOP + BAR_HEIGHT // 2]
    assert row[x0].tolist() == lut("inferno")[0].tolist() and row[x1].tolist() == lut("inferno")[255].tolist()
    assert not np.array_equal(bar, colour_bar(width, "inferno"))


def test_overlay_key_shows_the_overlay_marking():
    sample = mark_sample()
    assert (sample == MARK_COLOR).all(axis=-1).any() and (sample == 170).all(axis=-1).any()
    assert (sample[0] == 170).all()  # unmasked border of the sample keeps its colour


def test_below_appends_the_legend_and_gives_a_valid_png():
    legend = Legend(NAMES, PALETTE, "inferno", 0.275, overlay_key=True, extra_items=[("void", (0, 0, 0))],
                    notes=["errors: white = wrong"])
    image = np.random.default_rng(0).integers(0, 256, (100, 900, 3), dtype=np.uint8)
    out = legend.below(image)
    strip = legend.render(900)
    assert out.shape == (100 + strip.shape[0], 900, 3) and out.dtype == np.uint8
    assert np.array_equal(out[:100], image) and np.array_equal(out[100:], strip)
    parts = [class_legend(legend.items(), 900), colour_bar(900, "inferno", 0.275)]
    assert strip.shape[0] > sum(p.shape[0] for p in parts)  # + overlay key, notes and the bottom margin
    ok, png = cv2.imencode(".png", out)
    decoded = cv2.imdecode(png, cv2.IMREAD_UNCHANGED)
    assert ok and decoded.shape == out.shape and decoded.dtype == np.uint8
    assert len(legend.items()) == len(NAMES) + 1
    assert Legend(colormap=None).render(50).shape == (8, 50, 3)  # nothing to show: the margin only


def test_markdown_line_names_classes_and_colour_map():
    line = Legend(NAMES[:2], PALETTE[:2], "turbo", 0.5).markdown()
    assert "0 sky `#808080`" in line and "1 building `#800000`" in line and "`turbo`" in line and "0.500" in line



def test_readme_legend_matches_the_shipped_palette():
    """docs/legend.png (made by ``python -m uncertain_seg_ros.legend``) still shows the shipped classes' colours."""
    image = cv2.cvtColor(cv2.imread(str(REPO / "docs" / "legend.png")), cv2.COLOR_BGR2RGB)
    config = read_config(REPO / "models" / "camvid_demo")
    items = class_items(config.class_names, config.palette)
    for (y, x), colour in zip(_centres([text for text, _ in items], image.shape[1]), config.palette):
        assert image[y, x].tolist() == colour.tolist()
