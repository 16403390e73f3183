"""The shipped bundles: camvid_day (supervised on day/train) and camvid_demo (camvid_day adapted to dusk
and calibrated, the node's default): they load, stay small, and their committed report figures are reproduced."""
import json

import pytest

from uncertain_seg_ros.bundle import load_bundle
from uncertain_seg_ros.resources import resolve_bundle, sample_path
from uncertain_seg_training.evaluate import evaluate

from conftest import CAMVID, REPO

DEMO = REPO / "models" / "camvid_demo"
DAY = REPO / "models" / "camvid_day"
needs_camvid = pytest.mark.skipif(
    not (CAMVID / "day" / "test").is_dir(),
    reason=f"CamVid data not found at {CAMVID} (set UNCERTAIN_SEG_CAMVID to the camvid folder)",
)


@pytest.mark.parametrize("path", [DEMO, DAY], ids=["camvid_demo", "camvid_day"])
def test_shipped_bundles_load_and_are_small(path):
    bundle = load_bundle(path)
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size <= 25 * 1024 * 1024
    assert bundle.config.model.num_classes == 11 and bundle.config.ignore_index == 11
    assert resolve_bundle(path.name) == path


def test_demo_bundle_is_the_day_model_adapted_to_dusk_and_calibrated():
    day, demo = load_bundle(DAY), load_bundle(DEMO)
    assert day.config.provenance["data"]["train"].endswith("day/train")
    prov = demo.config.provenance
    assert prov["input_bundle"]["model_id"] == day.model_id and prov["stage"] == "adaptation (both)"
    assert prov["source_data"].endswith("day/train") and prov["target"]["frames"] == 62
    assert demo.config.calibration.method == "selective" and prov["calibration"]["data"].endswith("day/val")


def test_demo_on_bundled_samples(tmp_path):
    """The README's first command's job: the shipped bundle on the shipped frames writes a report."""
    metrics = evaluate("camvid_demo", sample_path("camvid_dusk"), tmp_path, device="cpu", montage_count=5)
    assert metrics["frames"] == 5 and 0.0 < metrics["miou"] <= 1.0
    assert (tmp_path / "montage.png").stat().st_size > 10_000


def _close(actual, expected, path=""):
    """Recursive comparison of metrics.json trees. CPU kernels (instruction set, thread count, the
    order of a sum) differ in the last bits, so floats agree to 1e-6 and pixel counts to 1 in 10^5:
    the few pixels that sit exactly on a bin edge or a selector decision may move."""
    if isinstance(expected, dict):
        for k, v in expected.items():
            _close(actual[k], v, f"{path}.{k}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected)):
            _close(a, e, f"{path}[{i}]")
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, abs=1e-6), path
    elif isinstance(expected, int) and not isinstance(expected, bool) and expected >= 100_000:
        assert actual == pytest.approx(expected, rel=1e-5), path
    else:
        assert actual == expected, path


@needs_camvid
@pytest.mark.parametrize("path", [DEMO, DAY], ids=["camvid_demo", "camvid_day"])
@pytest.mark.parametrize("split", ["day/test", "dusk/test"])
def test_report_figures_are_reproduced(path, split, tmp_path):
    """``uncertain-seg evaluate`` on the CamVid split gives the numbers of the committed report."""
    reports = REPO / "models" / "reports" / path.name
    committed = json.loads((reports / split.replace("/", "_") / "metrics.json").read_text())
    metrics = evaluate(path, CAMVID / split, tmp_path, device="cpu", montage_count=0)
    fresh = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["frames"] == committed["frames"]
    for key in ("miou", "pixel_accuracy", "per_class_iou", "uncertainty", "calibration", "mask", "model_id"):
        _close(fresh[key], committed[key], key)
