"""The shipped demo bundle: loads, stays small, and its committed report figures are reproduced."""
import json

import pytest

from uncertain_seg_ros.bundle import load_bundle
from uncertain_seg_ros.resources import resolve_bundle, sample_path
from uncertain_seg_training.evaluate import evaluate

from conftest import CAMVID, REPO

DEMO = REPO / "models" / "camvid_demo"
REPORTS = REPO / "models" / "reports" / "camvid_demo"
needs_camvid = pytest.mark.skipif(
    not (CAMVID / "day" / "test").is_dir(),
    reason=f"CamVid data not found at {CAMVID} (set UNCERTAIN_SEG_CAMVID to the camvid folder)",
)


def test_demo_bundle_loads_and_is_small():
    bundle = load_bundle(DEMO)
    size = sum(f.stat().st_size for f in DEMO.iterdir())
    assert size <= 25 * 1024 * 1024
    assert bundle.config.model.num_classes == 11 and bundle.config.ignore_index == 11
    assert bundle.config.provenance["data"]["train"].endswith("day/train")
    assert resolve_bundle("camvid_demo") == DEMO


def test_demo_on_bundled_samples(tmp_path):
    """The README's first command's job: the shipped bundle on the shipped frames writes a report."""
    metrics = evaluate("camvid_demo", sample_path("camvid_dusk"), tmp_path, device="cpu", montage_count=5)
    assert metrics["frames"] == 5 and 0.0 < metrics["miou"] <= 1.0
    assert (tmp_path / "montage.png").stat().st_size > 10_000


def _close(actual, expected, path=""):
    """Recursive comparison of metrics.json trees (floats to 1e-6: CPU kernels may differ in the last bits)."""
    if isinstance(expected, dict):
        for k, v in expected.items():
            _close(actual[k], v, f"{path}.{k}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected)):
            _close(a, e, f"{path}[{i}]")
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, abs=1e-6), path
    else:
        assert actual == expected, path


@needs_camvid
@pytest.mark.parametrize("split", ["day/test", "dusk/test"])
def test_demo_report_figures_are_reproduced(split, tmp_path):
    """``uncertain-seg evaluate`` on the CamVid split gives the numbers of the committed report."""
    committed = json.loads((REPORTS / split.replace("/", "_") / "metrics.json").read_text())
    metrics = evaluate(DEMO, CAMVID / split, tmp_path, device="cpu", montage_count=0)
    fresh = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["frames"] == committed["frames"]
    for key in ("miou", "pixel_accuracy", "per_class_iou", "uncertainty", "calibration", "mask", "model_id"):
        _close(fresh[key], committed[key], key)
