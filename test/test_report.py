"""Evaluation report folder and the colour maps it (and the node) use."""
import json
import math

import cv2
import matplotlib
import numpy as np
import pytest
import torch

from uncertain_seg_ros.colormap import COLORMAPS, colorize_labels, colorize_scalar, default_palette, lut
from uncertain_seg_ros.metrics import CalibrationBins, ConfusionMatrix, MisclassificationCurves
from uncertain_seg_ros.montage import GAP as _GAP
from uncertain_seg_ros.montage import HEADER_HEIGHT as _HEADER_H
from uncertain_seg_ros.montage import MAX_WIDTH as MONTAGE_MAX_WIDTH
from uncertain_seg_ros.montage import NAME_HEIGHT as _NAME_H
from uncertain_seg_training.report import (
    _VOID_GREY,
    MontageRow,
    metrics_dict,
    montage_image,
    montage_legend,
    write_report,
)
from uncertain_seg_ros.legend import SWATCH, class_items, swatch_layout

CLASSES = ["ground", "vegetation", "obstacle"]
PALETTE = np.array([[128, 64, 128], [0, 160, 0], [220, 20, 60]], dtype=np.uint8)
IGNORE = 255
PNGS = ("reliability.png", "pr_curves.png", "roc_curves.png", "montage.png")  # legend.png: its own test


def synthetic_row(seed: int, h: int = 24, w: int = 32) -> MontageRow:
    rng = np.random.default_rng(seed)
    target = rng.integers(0, 3, (h, w))
    target[:4] = IGNORE
    prediction = np.where(rng.random((h, w)) < 0.8, target % 3, rng.integers(0, 3, (h, w)))
    uncertainty = rng.random((h, w))
    return MontageRow(
        image=rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        target=target,
        prediction=prediction,
        uncertainty=uncertainty,
        mask=uncertainty > 0.7,
        name=f"frame_{seed:03d}",
    )


@pytest.fixture
def report_inputs():
    rows = [synthetic_row(1), synthetic_row(2)]
    confusion = ConfusionMatrix(3, ignore_index=IGNORE)
    curves = {"max_softmax": MisclassificationCurves(), "learned": MisclassificationCurves()}
    calibration = {"uncalibrated": CalibrationBins(15), "temperature": CalibrationBins(15)}
    for i, row in enumerate(rows):
        target, pred = torch.from_numpy(row.target), torch.from_numpy(row.prediction)
        u = torch.from_numpy(row.uncertainty)
        valid = target != IGNORE
        error = (pred != target) & valid
        confusion.update(pred, target)
        curves["max_softmax"].update(u, error, valid)
        curves["learned"].update(torch.rand(u.shape, generator=torch.Generator().manual_seed(i)), error, valid)
        calibration["uncalibrated"].update(1 - u, ~error, valid)
        calibration["temperature"].update(1 - 0.5 * u, ~error, valid)
    metrics = metrics_dict(
        confusion, curves, calibration, CLASSES, frames=2, not_a_number=float("nan"), mask={"precision": 0.25}
    )
    return metrics, curves, calibration, rows


def test_write_report_writes_every_file(tmp_path, report_inputs):
    metrics, curves, calibration, rows = report_inputs
    out = tmp_path / "report"
    md = write_report(
        out, "Synthetic check", metrics, curves, calibration, rows, CLASSES,
        notes=["a synthetic case"], palette=PALETTE, ignore_index=IGNORE, mask_threshold=0.7,
    )
    assert md == out / "report.md"
    for name in ("metrics.json", "report.md", "legend.png", *PNGS):
        assert (out / name).is_file(), name
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"
    for name in PNGS:
        image = cv2.imread(str(out / name), cv2.IMREAD_COLOR)
        assert image is not None, name
        h, w = image.shape[:2]
        assert 100 <= h <= 3000 and 200 <= w <= 2000, (name, image.shape)

    loaded = json.loads((out / "metrics.json").read_text())
    assert loaded["not_a_number"] is None
    assert loaded["frames"] == 2
    assert loaded["miou"] == pytest.approx(metrics["miou"])
    assert set(loaded["per_class_iou"]) == set(CLASSES)
    assert loaded["uncertainty"]["max_softmax"]["auroc"] == pytest.approx(curves["max_softmax"].auroc())
    assert loaded["calibration"]["temperature"]["ece"] == pytest.approx(calibration["temperature"].ece())
    assert json.loads((out / "metrics.json").read_text()) == loaded  # plain JSON, no NaN tokens
    assert "NaN" not in (out / "metrics.json").read_text()

    text = md.read_text()
    assert text.startswith("# Synthetic check")
    for name in ("legend.png", *PNGS):
        assert f"]({name})" in text
    assert "Legend. Classes (id, name, colour): 0 ground `#804080`, 1 vegetation `#00a000`, 2 obstacle `#dc143c`, " \
           "void (not scored) `#000000`." in text and "mask threshold 0.700" in text
    for name in (*CLASSES, "max_softmax", "learned", "uncalibrated", "temperature", "a synthetic case"):
        assert name in text
    assert f"{metrics['miou']:.4f}" in text
    assert "| mask.precision | 0.2500 |" in text


def test_write_report_replaces_an_existing_report_and_handles_no_data(tmp_path):
    out = tmp_path / "r"
    for _ in range(2):
        write_report(out, "Empty", {"miou": math.nan}, {}, {}, [], CLASSES)
    assert json.loads((out / "metrics.json").read_text()) == {"miou": None}
    for name in PNGS:
        assert cv2.imread(str(out / name)) is not None


def test_montage_layout_and_error_column():
    row = synthetic_row(3)
    montage = montage_image([row], PALETTE, IGNORE, CLASSES, 0.7)
    assert montage.dtype == np.uint8 and montage.shape[2] == 3
    assert montage.shape[1] <= MONTAGE_MAX_WIDTH
    tile_w = (montage.shape[1] - 7 * _GAP) // 6
    tile_h = round(tile_w * 24 / 32)
    top = _HEADER_H + _NAME_H
    x0 = _GAP + 5 * (tile_w + _GAP)
    errors = montage[top : top + tile_h, x0 : x0 + tile_w]
    # the first 4 of 24 label rows are void: grey; the rest black (right) or white (wrong)
    void_rows = tile_h * 4 // 24
    assert (errors[: void_rows - 1] == _VOID_GREY).all()
    body = errors[void_rows + 1 :]
    assert np.isin(body, [0, 255]).all() and (body == 255).any() and (body == 0).any()


def test_colorize_labels_numpy_and_torch_agree_and_void_is_black():
    labels = np.array([[0, 1, 2], [IGNORE, -1, 3]])
    rgb = colorize_labels(labels, PALETTE)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[0], PALETTE)
    assert (rgb[1] == 0).all()
    rgb_t = colorize_labels(torch.from_numpy(labels), torch.from_numpy(PALETTE))
    assert isinstance(rgb_t, torch.Tensor) and rgb_t.dtype == torch.uint8
    np.testing.assert_array_equal(rgb_t.numpy(), rgb)
    np.testing.assert_array_equal(colorize_labels(torch.from_numpy(labels), PALETTE).numpy(), rgb)


@pytest.mark.parametrize("name", COLORMAPS)
def test_colorize_scalar_numpy_and_torch_agree_and_match_matplotlib(name):
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.random(2000), [0.0, 1.0, -0.5, 1.5, np.nan]]).astype(np.float32)
    rgb = colorize_scalar(values, name)
    rgb_t = colorize_scalar(torch.from_numpy(values), name)
    np.testing.assert_array_equal(rgb_t.numpy(), rgb)
    np.testing.assert_array_equal(rgb[-3:], lut(name)[[0, 255, 0]])  # clipped; NaN -> vmin colour
    # matplotlib's bytes=True truncates; the core's tables are rounded
    reference = np.rint(matplotlib.colormaps[name](values[:-1])[:, :3] * 255)
    assert np.abs(rgb[:-1].astype(int) - reference).max() <= 1


def test_lut_and_default_palette():
    for name in COLORMAPS:
        table = lut(name)
        assert table.shape == (256, 3) and table.dtype == np.uint8 and not table.flags.writeable
    with pytest.raises(ValueError):
        lut("jet")
    palette = default_palette(20)
    assert palette.shape == (20, 3) and len({tuple(c) for c in palette}) == 20


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_colorize_on_cuda_stays_on_device():
    labels = torch.tensor([[0, 1], [2, IGNORE]], device="cuda")
    rgb = colorize_labels(labels, torch.from_numpy(PALETTE).cuda())
    assert rgb.device.type == "cuda"
    np.testing.assert_array_equal(rgb.cpu().numpy(), colorize_labels(labels.cpu().numpy(), PALETTE))
    u = torch.linspace(0, 1, 1000, device="cuda")
    np.testing.assert_array_equal(colorize_scalar(u).cpu().numpy(), colorize_scalar(u.cpu().numpy()))


def test_montage_has_the_legend_below_the_rows(tmp_path):
    """Same width as the grid, taller by exactly the legend's height; the legend's swatches carry the
    palette (+ void black) and the whole is still a valid RGB PNG."""
    rows = [synthetic_row(4), synthetic_row(5)]
    montage = montage_image(rows, PALETTE, IGNORE, CLASSES, 0.7)
    width = montage.shape[1]
    tile_w = (width - 7 * _GAP) // 6
    grid_h = _HEADER_H + 2 * (_NAME_H + round(tile_w * 24 / 32)) + _GAP
    legend = montage_legend(CLASSES, PALETTE, IGNORE, 0.7).render(width)
    assert montage.shape == (grid_h + legend.shape[0], width, 3)
    assert np.array_equal(montage[grid_h:], legend)
    labels = [text for text, _ in class_items(CLASSES, PALETTE)] + ["void (not scored)"]
    corners, _ = swatch_layout(labels, width)
    for (x, y), colour in zip(corners, [*PALETTE.tolist(), [0, 0, 0]]):
        assert montage[grid_h + y + SWATCH // 2, x + SWATCH // 2].tolist() == colour
    ok, png = cv2.imencode(".png", cv2.cvtColor(montage, cv2.COLOR_RGB2BGR))
    decoded = cv2.imdecode(png, cv2.IMREAD_COLOR)
    assert ok and decoded.shape == montage.shape and np.array_equal(cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB), montage)
    bare = montage_image(rows, PALETTE, None)  # no class names given: "class <id>", no void swatch
    assert bare.shape[1] == width and bare.shape[0] <= montage.shape[0]


def test_report_legend_png_shows_the_palette(tmp_path, report_inputs):
    metrics, curves, calibration, rows = report_inputs
    write_report(tmp_path, "t", metrics, curves, calibration, rows, CLASSES, palette=PALETTE, ignore_index=IGNORE)
    legend = cv2.cvtColor(cv2.imread(str(tmp_path / "legend.png")), cv2.COLOR_BGR2RGB)
    corners, _ = swatch_layout([text for text, _ in class_items(CLASSES, PALETTE)], legend.shape[1])
    for (x, y), colour in zip(corners, PALETTE.tolist()):
        assert legend[y + SWATCH // 2, x + SWATCH // 2].tolist() == colour
