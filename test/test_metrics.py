"""Streaming metrics pinned against scikit-learn and against cases worked out by hand."""
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix,
    fbeta_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from uncertain_seg_ros.metrics import CalibrationBins, ConfusionMatrix, MisclassificationCurves

BINS = 1000


def binned_case(n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Scores at bin centres ``(i + 0.5) / BINS`` (ties only between equal scores) and correlated errors."""
    rng = np.random.default_rng(seed)
    u = (rng.integers(0, BINS, n) + 0.5) / BINS
    error = rng.random(n) < 0.15 + 0.7 * u**2
    return u, error


def curves_of(u: np.ndarray, error: np.ndarray, bins: int = BINS) -> MisclassificationCurves:
    c = MisclassificationCurves(bins)
    c.update(torch.from_numpy(u), torch.from_numpy(error))
    return c


def sklearn_fpr95(u: np.ndarray, error: np.ndarray) -> float:
    fpr, tpr, _ = roc_curve(error, u, drop_intermediate=False)
    return float(fpr[np.argmax(tpr >= 0.95)])


# ---------------------------------------------------------------- misclassification detection


def test_ranking_metrics_match_sklearn_on_bin_centred_scores():
    u, error = binned_case()
    c = curves_of(u, error)
    assert c.auroc() == pytest.approx(roc_auc_score(error, u), abs=1e-9)
    assert c.aupr() == pytest.approx(average_precision_score(error, u), abs=1e-9)
    assert c.fpr_at_tpr(0.95) == pytest.approx(sklearn_fpr95(u, error), abs=1e-9)
    assert c.error_rate() == pytest.approx(error.mean(), abs=1e-12)
    assert c.count() == len(u)


def test_curves_match_sklearn_point_for_point():
    u, error = binned_case(seed=1)
    c = curves_of(u, error)
    fpr, tpr = c.roc_curve()
    ref_fpr, ref_tpr, _ = roc_curve(error, u, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, ref_tpr, atol=1e-12)
    precision, recall = c.pr_curve()
    ref_p, ref_r, _ = precision_recall_curve(error, u)
    np.testing.assert_allclose(precision, ref_p, atol=1e-12)
    np.testing.assert_allclose(recall, ref_r, atol=1e-12)


def test_heavy_ties_are_handled_like_sklearn():
    # only 5 distinct scores for 400 pixels: every bin is a block of tied scores
    rng = np.random.default_rng(2)
    u = (rng.integers(0, 5, 400) * 200 + 0.5) / BINS
    error = rng.random(400) < u
    c = curves_of(u, error)
    assert c.auroc() == pytest.approx(roc_auc_score(error, u), abs=1e-9)
    assert c.aupr() == pytest.approx(average_precision_score(error, u), abs=1e-9)
    assert c.fpr_at_tpr(0.95) == pytest.approx(sklearn_fpr95(u, error), abs=1e-9)


def test_random_float_scores_agree_within_bin_resolution():
    rng = np.random.default_rng(3)
    u = rng.random(3000)
    error = rng.random(3000) < 0.1 + 0.6 * u
    c = curves_of(u, error, bins=10000)
    assert c.auroc() == pytest.approx(roc_auc_score(error, u), abs=2e-3)
    assert c.aupr() == pytest.approx(average_precision_score(error, u), abs=2e-3)
    assert c.fpr_at_tpr(0.95) == pytest.approx(sklearn_fpr95(u, error), abs=2e-3)


def test_max_f05_matches_sklearn_fbeta_at_every_edge():
    bins = 50
    rng = np.random.default_rng(4)
    u = (rng.integers(0, bins, 500) + 0.5) / bins
    error = rng.random(500) < u
    accurate = ~error
    best, best_t = -1.0, None
    for k in range(1, bins + 1):  # gamma-SSL: positive = accurate, predicted positive = certain (u <= t)
        t = k / bins
        f = fbeta_score(accurate, u <= t, beta=0.5, zero_division=0.0)
        if f > best + 1e-15:
            best, best_t = f, t
    f05, t = curves_of(u, error, bins).max_f05()
    assert f05 == pytest.approx(best, abs=1e-9)
    assert t == pytest.approx(best_t, abs=1e-12)


def test_six_pixel_case_by_hand():
    # u:      0.05 0.15 0.25 0.35 0.75 0.95     (bins = 10, so bins 0 1 2 3 7 9)
    # error:  no   no   yes  no   yes  no       -> 4 accurate, 2 misclassified
    # certain = u <= t; TP = accurate & certain, FP = error & certain, FN = accurate & uncertain
    #   t=0.1: TP1 FP0 FN3  P=1   R=.25  F=1.25*.25/(.25+.25)          = 0.625
    #   t=0.2: TP2 FP0 FN2  P=1   R=.5   F=1.25*.5/(.25+.5)            = 0.8333  <- max
    #   t=0.3: TP2 FP1 FN2  P=2/3 R=.5   F=1.25*(1/3)/(1/6+1/2)        = 0.625
    #   t=0.4..0.7: TP3 FP1 FN1  P=R=.75 F=.75
    #   t=0.8, 0.9: TP3 FP2 FN1  P=.6 R=.75  F=.5625/.9               = 0.625
    #   t=1.0: TP4 FP2 FN0  P=2/3 R=1    F=(5/6)/(7/6)                 = 0.7143
    # AUROC: error 0.25 beats 2 of 4 correct, 0.75 beats 3 of 4 -> 5/8.
    # AP (descending 0.95- 0.75+ 0.35- 0.25+): R .5 at P 1/2, R 1 at P 2/4 -> .5*.5 + .5*.5 = 0.5.
    # FPR95: TPR reaches 1 once 0.25 is flagged; flagged correct = {0.95, 0.35} -> 2/4.
    u = torch.tensor([0.05, 0.15, 0.25, 0.35, 0.75, 0.95])
    error = torch.tensor([False, False, True, False, True, False])
    c = MisclassificationCurves(10)
    c.update(u, error)
    f05, t = c.max_f05()
    assert f05 == pytest.approx(5 / 6, abs=1e-12)
    assert t == pytest.approx(0.2)
    assert c.auroc() == pytest.approx(5 / 8, abs=1e-12)
    assert c.aupr() == pytest.approx(0.5, abs=1e-12)
    assert c.fpr_at_tpr(0.95) == pytest.approx(0.5, abs=1e-12)
    d = c.to_dict()
    assert set(d) == {"auroc", "aupr", "aupr_minus_error_rate", "fpr95", "max_f05", "max_f05_minus_floor",
                      "max_f05_threshold", "error_rate", "pixels"}
    assert d["pixels"] == 6 and d["error_rate"] == pytest.approx(1 / 3)
    # Flag-nothing floor at accuracy 2/3: 1.25 (2/3) / (0.25 (2/3) + 1) = 5/7, the t = 1.0 row above.
    assert c.f05_floor() == pytest.approx(5 / 7, abs=1e-12)
    assert d["max_f05_minus_floor"] == pytest.approx(5 / 6 - 5 / 7, abs=1e-12)
    assert d["aupr_minus_error_rate"] == pytest.approx(0.5 - 1 / 3, abs=1e-12)


def test_perfectly_separating_score():
    u = torch.tensor([0.01, 0.2, 0.3, 0.6, 0.8, 0.99])
    error = u > 0.5
    c = MisclassificationCurves()
    c.update(u, error)
    assert c.auroc() == pytest.approx(1.0)
    assert c.aupr() == pytest.approx(1.0)
    assert c.fpr_at_tpr(0.95) == 0.0
    f05, t = c.max_f05()
    assert f05 == pytest.approx(1.0)
    assert 0.3 < t <= 0.6


def test_clamping_valid_mask_and_shapes():
    # out-of-range scores are clamped; u = 1.0 lands in the last bin; invalid pixels are skipped
    u = torch.tensor([[-0.5, 0.0, 1.0], [1.5, 0.5, 0.5]])
    error = torch.tensor([[False, False, True], [True, True, False]])
    valid = torch.tensor([[True, True, True], [True, False, True]])
    c = MisclassificationCurves(4)
    c.update(u, error, valid)
    errors, correct = c.histograms()
    np.testing.assert_array_equal(errors, [0, 0, 0, 2])
    np.testing.assert_array_equal(correct, [2, 0, 1, 0])
    assert c.count() == 5


def test_empty_and_one_class_cases_are_nan():
    c = MisclassificationCurves(10)
    assert math.isnan(c.auroc()) and math.isnan(c.aupr()) and math.isnan(c.error_rate())
    assert all(math.isnan(v) for v in c.max_f05())
    c.update(torch.tensor([0.1, 0.9]), torch.tensor([False, False]))
    assert math.isnan(c.auroc()) and math.isnan(c.aupr()) and math.isnan(c.fpr_at_tpr())
    assert c.max_f05()[0] == pytest.approx(1.0)


# ---------------------------------------------------------------- confusion matrix


def test_confusion_matrix_by_hand_with_ignore():
    # target 0 0 0 0 1 1 2, pred 0 0 0 1 1 1 0 -> rows (target) [3 1 0 0] [0 2 0 0] [1 0 0 0] [0 0 0 0]
    # IoU: c0 3/(4+4-3)=.6, c1 2/(2+3-2)=2/3, c2 0/(1+0-0)=0, c3 absent -> NaN; mIoU = (.6+2/3+0)/3
    target = torch.tensor([0, 0, 0, 0, 1, 1, 2, 255, 255, -1])
    pred = torch.tensor([0, 0, 0, 1, 1, 1, 0, 3, 0, 2])
    cm = ConfusionMatrix(4, ignore_index=255)
    cm.update(pred.reshape(2, 5), target.reshape(2, 5))
    expected = np.array([[3, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(cm.matrix, expected)
    assert cm.matrix.dtype == np.int64
    iou = cm.iou()
    np.testing.assert_allclose(iou[:3], [0.6, 2 / 3, 0.0])
    assert np.isnan(iou[3])
    assert cm.miou() == pytest.approx((0.6 + 2 / 3) / 3)
    assert cm.pixel_accuracy() == pytest.approx(5 / 7)
    assert cm.count() == 7


def test_confusion_matrix_matches_sklearn():
    rng = np.random.default_rng(5)
    target = rng.integers(0, 6, (3, 20, 30))
    target[rng.random(target.shape) < 0.1] = 255
    pred = rng.integers(0, 6, target.shape)
    cm = ConfusionMatrix(6, ignore_index=255)
    cm.update(torch.from_numpy(pred), torch.from_numpy(target))
    keep = target != 255
    np.testing.assert_array_equal(cm.matrix, confusion_matrix(target[keep], pred[keep], labels=range(6)))


def test_confusion_matrix_rejects_out_of_range_prediction():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError):
        cm.update(torch.tensor([0, 3]), torch.tensor([0, 1]))


# ---------------------------------------------------------------- calibration


def test_ece_three_bins_by_hand():
    # bins [0,1/3) [1/3,2/3) [2/3,1]
    # conf 0.2 ok | 0.5 ok, 0.6 wrong | 0.9 ok, 0.8 ok, 1.0 wrong
    # bin0: n1 conf .2  acc 1   gap .8
    # bin1: n2 conf .55 acc .5  gap .05
    # bin2: n3 conf .9  acc 2/3 gap .2333
    # ECE = (1*.8 + 2*.05 + 3*.2333) / 6 = 1.6 / 6
    conf = torch.tensor([0.2, 0.5, 0.6, 0.9, 0.8, 1.0], dtype=torch.float64)
    correct = torch.tensor([True, True, False, True, True, False])
    b = CalibrationBins(3)
    b.update(conf, correct)
    assert b.ece() == pytest.approx(1.6 / 6, abs=1e-12)
    rel = b.reliability()
    np.testing.assert_array_equal(rel["count"], [1, 2, 3])
    np.testing.assert_allclose(rel["confidence"], [0.2, 0.55, 0.9])
    np.testing.assert_allclose(rel["accuracy"], [1.0, 0.5, 2 / 3])
    np.testing.assert_allclose(rel["bin_lower"], [0, 1 / 3, 2 / 3])
    np.testing.assert_allclose(rel["bin_upper"], [1 / 3, 2 / 3, 1])
    d = b.to_dict()
    assert d["ece"] == pytest.approx(1.6 / 6) and d["pixels"] == 6
    assert d["accuracy"] == pytest.approx(4 / 6)


def test_ece_matches_numpy_reference_and_empty_bins_are_nan():
    rng = np.random.default_rng(6)
    conf = rng.uniform(0.5, 1.0, 2000)
    correct = rng.random(2000) < conf**2
    valid = rng.random(2000) < 0.9
    b = CalibrationBins(15)
    b.update(torch.from_numpy(conf), torch.from_numpy(correct), torch.from_numpy(valid))
    c, ok = conf[valid], correct[valid]
    idx = np.minimum((c * 15).astype(int), 14)
    ref = sum(abs(ok[idx == k].mean() - c[idx == k].mean()) * (idx == k).sum() for k in np.unique(idx)) / len(c)
    assert b.ece() == pytest.approx(ref, abs=1e-12)
    rel = b.reliability()
    assert np.isnan(rel["accuracy"][:7]).all() and (rel["count"][:7] == 0).all()
    assert rel["count"].sum() == valid.sum()


# ---------------------------------------------------------------- streaming and distributed state


def _empty():
    return ConfusionMatrix(4, ignore_index=3), MisclassificationCurves(100), CalibrationBins(10)


def _filled(seed: int = 7, chunks: int = 1):
    rng = np.random.default_rng(seed)
    target = torch.from_numpy(rng.integers(0, 4, (4, 16, 16)))
    pred = torch.from_numpy(rng.integers(0, 4, (4, 16, 16)))
    u = torch.from_numpy(rng.random((4, 16, 16)))
    valid = target != 3
    error = pred != target
    cm, cu, cb = _empty()
    for idx in torch.arange(4).chunk(chunks):
        cm.update(pred[idx], target[idx])
        cu.update(u[idx], error[idx], valid[idx])
        cb.update(1 - u[idx], ~error[idx], valid[idx])
    return cm, cu, cb


def _assert_same_state(a, b, atol=0.0):
    for x, y in zip(a.state(), b.state()):
        torch.testing.assert_close(x, y, rtol=0, atol=atol)


def test_chunked_updates_equal_one_update():
    whole, chunked = _filled(chunks=1), _filled(chunks=4)
    for a, b in zip(whole, chunked):
        _assert_same_state(a, b, atol=1e-12)
    assert whole[1].to_dict() == chunked[1].to_dict()
    assert whole[2].ece() == pytest.approx(chunked[2].ece(), abs=1e-12)


def test_state_round_trip_and_all_reduce_sum_equal_merge():
    a, b = _filled(seed=8), _filled(seed=9)
    for x, y, restored, merged in zip(a, b, _empty(), _empty()):
        restored.load_state([t.clone() for t in x.state()])
        _assert_same_state(restored, x)
        # what all_reduce(SUM) over two ranks leaves on each rank, loaded back
        restored.load_state([s + t for s, t in zip(x.state(), y.state())])
        merged.merge(x)
        merged.merge(y)
        _assert_same_state(restored, merged, atol=1e-12)
    total = _empty()[0]
    total.load_state([a[0].state()[0] + b[0].state()[0]])
    np.testing.assert_array_equal(total.matrix, a[0].matrix + b[0].matrix)
    assert a[1].to_dict() == _round_trip(a[1]).to_dict()


def _round_trip(c: MisclassificationCurves) -> MisclassificationCurves:
    fresh = MisclassificationCurves(c.bins)
    fresh.load_state(c.state())
    return fresh


def test_load_state_rejects_wrong_shapes():
    with pytest.raises(ValueError):
        MisclassificationCurves(10).load_state([torch.zeros(7, dtype=torch.int64)])
    with pytest.raises(ValueError):
        CalibrationBins(5).load_state([torch.zeros(5)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inputs_accumulate_on_the_device_and_agree_with_cpu():
    u, error = binned_case(seed=10)
    cpu = curves_of(u, error)
    gpu = MisclassificationCurves(BINS)
    gpu.update(torch.from_numpy(u).float().cuda(), torch.from_numpy(error).cuda())
    assert gpu.state()[0].device.type == "cuda"
    assert gpu.to_dict() == cpu.to_dict()
    cm = ConfusionMatrix(3, ignore_index=255, device="cuda")
    cm.update(torch.tensor([0, 1, 2], device="cuda"), torch.tensor([0, 255, 2], device="cuda"))
    assert cm.state()[0].device.type == "cuda" and cm.pixel_accuracy() == 1.0
    cb = CalibrationBins(10)
    cb.update(torch.tensor([0.95, 0.55], device="cuda"), torch.tensor([True, False], device="cuda"))
    assert cb.ece() == pytest.approx((0.05 + 0.55) / 2)
