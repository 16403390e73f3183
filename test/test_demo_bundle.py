"""The shipped bundles: camvid_day (supervised on day/train) and camvid_demo (camvid_day adapted to dusk
and calibrated, the node's default): they load, stay small, and their committed report figures are reproduced."""
import json
import math

import numpy as np
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


def test_demo_bundle_is_the_arm_the_adaptation_experiment_selected():
    """camvid_demo: camvid_day continued with random patch masking (seed 0), BatchNorm statistics
    re-estimated on the 62 unlabelled dusk frames, selective-calibrated on the tuning part of dusk/test."""
    day, demo = load_bundle(DAY), load_bundle(DEMO)
    prov = demo.config.provenance
    assert prov["experiment"]["arm"] == "bn_stats" and prov["experiment"]["seed"] == 0
    assert prov["stage"] == "adaptation (bn_stats)" and prov["target"]["frames"] == 62
    source = prov["previous"]
    assert source["init_bundle"]["model_id"] in (day.model_id, day.config.provenance["re_export"]["previous_model_id"])
    assert source["mask_ratio_max"] == 0.5 and source["data"]["train"].endswith("day/train")
    cal = prov["calibration"]
    assert demo.config.calibration.method == "selective" and cal["data"].endswith("dusk_tune") and cal["frames"] == 10
    assert cal["selective"]["weighting"] == "duplicate"


def test_demo_on_bundled_samples(tmp_path):
    """The README's first command's job: the shipped bundle on the shipped frames writes a report."""
    metrics = evaluate("camvid_demo", sample_path("camvid_dusk"), tmp_path, device="cpu", montage_count=5)
    assert metrics["frames"] == 5 and 0.0 < metrics["miou"] <= 1.0
    assert (tmp_path / "montage.png").stat().st_size > 10_000


# Pixels whose outcome may differ between CPUs, as a fraction of the evaluated pixels. CPU kernels
# (instruction set, thread count, the order of a sum) differ in the last bits, which moves the few
# pixels that sit on a decision: an argmax tie, a histogram or calibration bin edge, the selector's
# 0.5. Every figure's tolerance below is what moving that many pixels can do to it.
MOVED_PIXEL_FRACTION = 1e-5


class PixelBudget:
    """Tolerances of a metrics.json that follow from letting ``d`` pixels change outcome.

    One moved pixel can change a count by 1, so a ratio of counts ``a / n`` by at most ``2 / n``
    (numerator and denominator); each figure's denominator is read from the fresh evaluation.
    """

    def __init__(self, metrics: dict) -> None:
        confusion = np.asarray(metrics["confusion_matrix"], dtype=np.int64)
        self.pixels = int(confusion.sum())
        self.d = math.ceil(MOVED_PIXEL_FRACTION * self.pixels)
        inter = np.diag(confusion)
        self.union = confusion.sum(0) + confusion.sum(1) - inter

    def ratio(self, denominator: float) -> float:
        """Largest change of a ratio of counts with this denominator (1 when it is within the budget)."""
        return 1.0 if denominator <= 2 * self.d else 2 * self.d / denominator

    def curve(self, errors: float) -> float:
        """AUROC, AUPR, FPR95, F0.5: a moved pixel shifts the curves by 1 / errors or 1 / correct pixels."""
        return self.ratio(errors) + self.ratio(self.pixels - errors)


def _check(actual, expected, tol: float, path: str) -> None:
    if expected is None:
        assert actual is None or tol >= 1.0, path
    else:
        assert actual == pytest.approx(expected, abs=tol), path


def _compare(fresh: dict, committed: dict) -> None:
    """Each committed figure is reproduced within what ``MOVED_PIXEL_FRACTION`` allows it to move."""
    b = PixelBudget(fresh)
    assert fresh["model_id"] == committed["model_id"]
    _check(fresh["pixel_accuracy"], committed["pixel_accuracy"], b.ratio(b.pixels), "pixel_accuracy")
    names = list(committed["per_class_iou"])
    iou_tols = []
    for i, name in enumerate(names):
        tol = b.ratio(b.union[i])
        _check(fresh["per_class_iou"][name], committed["per_class_iou"][name], tol, f"per_class_iou.{name}")
        if committed["per_class_iou"][name] is not None:
            iou_tols.append(tol)
    _check(fresh["miou"], committed["miou"], float(np.mean(iou_tols)), "miou")
    for source, c in committed["uncertainty"].items():
        f = fresh["uncertainty"][source]
        assert f["pixels"] == c["pixels"] == b.pixels, source
        errors = c["error_rate"] * b.pixels
        _check(f["error_rate"], c["error_rate"], b.ratio(b.pixels), f"{source}.error_rate")
        for key in ("auroc", "aupr", "fpr95", "max_f05"):
            _check(f[key], c[key], b.curve(errors), f"{source}.{key}")
        # The threshold is an argmax: where the F0.5 curve is flat to within the tolerance above it may
        # move along the flat part, so it is held to a hundredth, its F0.5 to the pixel budget.
        _check(f["max_f05_threshold"], c["max_f05_threshold"], 0.01, f"{source}.max_f05_threshold")
    for name, c in committed["calibration"].items():
        f = fresh["calibration"][name]
        assert f["pixels"] == c["pixels"] == b.pixels and f["n_bins"] == c["n_bins"], name
        # ECE sums |correct - confidence| over bins / N: a moved pixel changes two bins' sums and its correctness.
        _check(f["ece"], c["ece"], 1.5 * b.ratio(b.pixels), f"{name}.ece")
        for key in ("accuracy", "mean_confidence"):
            _check(f[key], c[key], b.ratio(b.pixels), f"{name}.{key}")
        for i, n in enumerate(c["bin_count"]):
            assert abs(f["bin_count"][i] - n) <= b.d, f"{name}.bin_count[{i}]"
            for key in ("bin_accuracy", "bin_confidence"):
                _check(f[key][i], c[key][i], b.ratio(n), f"{name}.{key}[{i}]")
    flagged = committed["mask"]["flagged_fraction"] * b.pixels
    errors = committed["uncertainty"]["max_softmax"]["error_rate"] * b.pixels
    _check(fresh["mask"]["flagged_fraction"], committed["mask"]["flagged_fraction"], b.ratio(b.pixels), "mask.flagged_fraction")
    _check(fresh["mask"]["precision"], committed["mask"]["precision"], b.ratio(flagged), "mask.precision")
    _check(fresh["mask"]["recall"], committed["mask"]["recall"], b.ratio(errors), "mask.recall")


def test_pixel_budget_tolerances_follow_from_the_counts():
    """The tolerances are those of ratios of counts: one pixel's worth, doubled, per moved pixel."""
    confusion = [[900_000, 100_000], [50_000, 950_000]]  # 2M pixels: d = 20
    b = PixelBudget({"confusion_matrix": confusion})
    assert (b.pixels, b.d) == (2_000_000, 20)
    assert b.ratio(b.pixels) == pytest.approx(2e-5)
    assert b.ratio(b.union[0]) == pytest.approx(40 / 1_050_000)
    assert b.ratio(30) == 1.0  # a bin of 30 pixels can be emptied by the budget: anything goes
    assert b.curve(500_000) == pytest.approx(40 / 500_000 + 40 / 1_500_000)


@needs_camvid
@pytest.mark.parametrize("path", [DEMO, DAY], ids=["camvid_demo", "camvid_day"])
def test_report_figures_are_reproduced(path, tmp_path):
    """``uncertain-seg evaluate`` on CamVid dusk/test gives the numbers of the committed report.

    One split per bundle: day/test runs the same code on the same bundle (171 frames, four minutes
    of the suite each), so a change of the decoding, the metrics or the bundle shows on dusk/test
    already; that the day/test reports belong to the shipped bundles is checked below.
    """
    reports = REPO / "models" / "reports" / path.name
    committed = json.loads((reports / "dusk_test" / "metrics.json").read_text())
    metrics = evaluate(path, CAMVID / "dusk" / "test", tmp_path, device="cpu", montage_count=0, skip=committed["skipped_frames"])
    fresh = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["frames"] == committed["frames"]
    _compare(fresh, committed)


@pytest.mark.parametrize("path", [DEMO, DAY], ids=["camvid_demo", "camvid_day"])
@pytest.mark.parametrize("split", ["day_test", "dusk_test"])
def test_committed_reports_are_of_the_shipped_bundles(path, split):
    """Every committed report was made with the bundle as shipped, its calibration and threshold."""
    bundle = load_bundle(path)
    committed = json.loads((REPO / "models" / "reports" / path.name / split / "metrics.json").read_text())
    assert committed["model_id"] == bundle.model_id
    assert committed["data"].endswith(split.replace("_", "/"))
    assert committed["mask_threshold"] == bundle.config.mask_threshold
    assert committed["calibration_method"] == bundle.config.calibration.method
