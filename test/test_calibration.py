"""Calibration: temperature and selective scaling, their bundle storage, decode, mask thresholds, calibrate CLI."""
import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from uncertain_seg_ros.bundle import CHECKSUMS_FILE, CONFIG_FILE, WEIGHTS_FILE, BundleError, load_bundle, save_bundle, sha256_file
from uncertain_seg_ros.calibration import Calibration, SelectiveScaler
from uncertain_seg_ros.metrics import CalibrationBins, MisclassificationCurves
from uncertain_seg_ros.model import SegmenterConfig, UncertainSegmenter
from uncertain_seg_ros.prediction import SELECTOR_GRID_SCALE, decode, selector_flags
from uncertain_seg_training.calibrate import calibrate
from uncertain_seg_training.calibration_fit import (
    fit_mask_threshold,
    fit_selective_temperature,
    fit_temperature,
    nll,
    selective_logits,
    selector_scores,
    train_selector,
)
from uncertain_seg_training.cli import main as cli_main
from uncertain_seg_training.datasets import LabelledFolder
from uncertain_seg_training.evaluate import run_evaluation

from conftest import tiny_bundle_config


def _ece(logits: torch.Tensor, labels: torch.Tensor) -> float:
    bins = CalibrationBins(15)
    conf, pred = logits.softmax(dim=1).max(dim=1)
    bins.update(conf, pred == labels)
    return bins.ece()


def _selective_split(n: int = 20000, k: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel logits (N, K) and labels: 3/4 calibrated (never predicting class 0), 1/4 confidently class 0 and always wrong."""
    g = torch.Generator().manual_seed(seed)
    n_bad = n // 4
    good = torch.randn(n - n_bad, k, generator=g) * 8.0
    good[:, 0] -= 8.0
    good_labels = torch.multinomial(good.softmax(dim=1), 1, generator=g)[:, 0]
    bad = torch.randn(n_bad, k, generator=g) * 0.5
    bad[:, 0] += 6.0
    bad_labels = torch.randint(1, k, (n_bad,), generator=g)
    return torch.cat([good, bad]), torch.cat([good_labels, bad_labels])


@pytest.fixture(scope="module")
def selective_fit():
    """The synthetic split with its trained selector (trained once for the module)."""
    logits, labels = _selective_split()
    selector = train_selector(logits, labels, hidden=32, steps=100, batch_size=1024, lr=3e-3, seed=0, progress=False)
    return logits, labels, selector


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# --------------------------------------------------------------------------- fitting


def test_temperature_fit_recovers_known_temperature():
    """Labels drawn from softmax(z / 2.5): the fitted T is within 5% of 2.5 and lowers the NLL."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(100_000, 6, generator=g) * 5.0
    labels = torch.multinomial((logits / 2.5).softmax(dim=1), 1, generator=g)[:, 0]
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(2.5, rel=0.05)
    assert nll(logits, labels, t) <= nll(logits, labels)
    assert nll(logits, labels, t) == pytest.approx(F.cross_entropy(logits / t, labels).item(), rel=1e-5)


def test_selector_flags_systematic_errors_and_beats_temperature(selective_fit):
    """The selector detects the confidently wrong region (AUROC > 0.9) and selective scaling has lower ECE than temperature scaling."""
    logits, labels, selector = selective_fit
    errors = logits.argmax(dim=1) != labels
    scores = selector_scores(selector, logits)
    curves = MisclassificationCurves()
    curves.update(torch.sigmoid(scores), errors)
    assert curves.auroc() > 0.9
    flagged = scores > 0
    t_sel = fit_selective_temperature(logits, labels, flagged)
    assert 1.0 <= t_sel <= 100.0
    t = fit_temperature(logits, labels)
    ece_selective = _ece(selective_logits(logits, flagged, t_sel), labels)
    ece_temperature = _ece(logits / t, labels)
    assert ece_selective < ece_temperature < _ece(logits, labels)
    assert nll(selective_logits(logits, flagged, t_sel), labels) < nll(logits, labels)


def test_selector_rows_and_maps_agree(selective_fit):
    """The selector scores pixel rows (fitting) exactly as it scores (B, K, H, W) maps (decode)."""
    logits, _, selector = selective_fit
    rows = logits[:48]
    maps = rows.T.reshape(1, rows.shape[1], 6, 8)
    torch.testing.assert_close(selector.forward_rows(rows), selector(maps).flatten())


# --------------------------------------------------------------------------- configuration and bundle


def test_calibration_dict_round_trip_and_old_configs():
    """to_dict/from_dict round trip; a config with only ``temperature`` still loads; bad values are refused."""
    cal = Calibration(method="selective", selective_temperature=37.5, fit={"pixels": 10, "nll_before": 1.2})
    assert Calibration.from_dict(json.loads(json.dumps(cal.to_dict()))) == cal
    old = Calibration.from_dict({"temperature": 1.7})
    assert (old.method, old.temperature) == ("temperature", 1.7)
    assert Calibration.from_dict({"temperature": 1.0}).method == "none"
    assert Calibration(3.0).method == "temperature" and Calibration().method == "none"
    z = torch.randn(1, 3, 2, 2)
    assert torch.equal(Calibration(method="none", temperature=1.0).apply(z), z)
    with pytest.raises(ValueError, match="method"):
        Calibration(method="platt")
    with pytest.raises(ValueError, match="selective_temperature"):
        Calibration(method="selective", selective_temperature=0.0)
    with pytest.raises(ValueError, match="unknown calibration keys"):
        Calibration.from_dict({"temperature": 1.0, "bogus": 1})


def test_selective_without_selector_raises():
    """Selective calibration without the model's selector raises a ValueError saying what is missing."""
    with pytest.raises(ValueError, match="selector"):
        Calibration(method="selective", selective_temperature=10.0).apply(torch.randn(1, 3, 2, 2))


def test_selector_round_trip_through_bundle(tmp_path):
    """The selector lives in model.safetensors, loads strictly, is frozen, and is absent for old model configs."""
    base = tiny_bundle_config()
    config = replace(base, model=replace(base.model, selector_hidden=16),
                     calibration=Calibration(method="selective", selective_temperature=25.0, fit={"pixels": 3}))
    torch.manual_seed(0)
    model = UncertainSegmenter(config.model)
    path = save_bundle(tmp_path / "b", model, config)
    stored = load_file(str(path / WEIGHTS_FILE))
    assert {k for k in stored if k.startswith("selector.")} == {k for k in model.state_dict() if k.startswith("selector.")} != set()
    loaded = load_bundle(path)
    assert loaded.config == config
    assert loaded.config.calibration.method == "selective" and loaded.config.calibration.fit == {"pixels": 3}
    assert isinstance(loaded.model.selector, SelectiveScaler)
    assert not any(p.requires_grad for p in loaded.model.selector.parameters())
    for k, v in model.selector.state_dict().items():
        assert torch.equal(loaded.model.selector.state_dict()[k], v)

    old_model_dict = {k: v for k, v in base.model.to_dict().items() if k != "selector_hidden"}
    assert SegmenterConfig.from_dict(old_model_dict).selector_hidden == 0
    assert UncertainSegmenter(SegmenterConfig.from_dict(old_model_dict)).selector is None

    # A config that announces a selector whose weights are not in the file is refused (strict load).
    plain = save_bundle(tmp_path / "plain", UncertainSegmenter(base.model), base)
    raw = json.loads((plain / CONFIG_FILE).read_text())
    raw["model"]["selector_hidden"] = 16
    (plain / CONFIG_FILE).write_text(json.dumps(raw))
    (plain / CHECKSUMS_FILE).write_text("".join(f"{sha256_file(plain / n)}  {n}\n" for n in (WEIGHTS_FILE, CONFIG_FILE)))
    with pytest.raises(BundleError, match="missing .*selector"):
        load_bundle(plain)


# --------------------------------------------------------------------------- decode


@pytest.mark.parametrize("size", [(12, 16), (60, 88)], ids=["per_pixel", "beyond_selector_grid"])
def test_decode_selective_flattens_flagged_pixels_only(size):
    """Flagged pixels lose confidence, unflagged ones equal T = 1, and no calibration changes the labels.

    Up to ``SELECTOR_GRID_SCALE`` times the network's grid the selector scores every output pixel;
    beyond, it scores that grid and its scores are upsampled before the sign test.
    """
    torch.manual_seed(0)
    k, grid = 4, (6, 8)
    logits, loss = torch.randn(2, k, *grid) * 4, torch.rand(2, 1, *grid)
    selector = SelectiveScaler(k, 8).eval()
    up = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    scored = tuple(min(s, g * SELECTOR_GRID_SCALE) for s, g in zip(size, grid))
    with torch.no_grad():
        selector.mlp[-1].bias -= selector(up).median()
        flagged = selector_flags(selector, logits, size)
        scores = F.interpolate(selector(F.interpolate(logits, size=scored, mode="bilinear", align_corners=False)),
                               size=size, mode="bilinear", align_corners=False)
    assert torch.equal(flagged, scores[:, 0] > 0)
    if scored == size:
        assert torch.equal(flagged, selector(up)[:, 0] > 0)
    assert flagged.float().mean().item() == pytest.approx(0.5, abs=0.1)
    raw = decode(logits, loss, size, Calibration(), "max_softmax", 0.5)
    sel = decode(logits, loss, size, Calibration(method="selective", selective_temperature=20.0), "max_softmax", 0.5,
                 selector=selector)
    assert (sel.confidence[flagged] < raw.confidence[flagged]).all()
    assert torch.equal(sel.confidence[~flagged], raw.confidence[~flagged])
    assert torch.equal(sel.probs.permute(0, 2, 3, 1)[~flagged], raw.probs.permute(0, 2, 3, 1)[~flagged])
    for cal in (Calibration(0.3), Calibration(7.0), Calibration(method="selective", selective_temperature=100.0)):
        assert torch.equal(decode(logits, loss, size, cal, "entropy", 0.5, selector=selector).labels, raw.labels)


# --------------------------------------------------------------------------- mask threshold


def test_mask_threshold_rules():
    """Target FPR: the smallest threshold with FPR <= target on the split; f05: max_f05()'s threshold."""
    g = torch.Generator().manual_seed(1)
    u = torch.rand(50_000, generator=g)
    error = torch.rand(50_000, generator=g) < u**2
    correct = ~error
    for target in (0.01, 0.05, 0.2):
        t = fit_mask_threshold(u, error, target)
        allowed = int(target * int(correct.sum()))
        assert int(((u > t) & correct).sum()) <= allowed
        assert int(((u >= t) & correct).sum()) > allowed  # any lower threshold exceeds the target
    curves = MisclassificationCurves()
    curves.update(u, error)
    assert fit_mask_threshold(u, error, "f05") == curves.max_f05()[1]
    with pytest.raises(ValueError, match="false-positive rate"):
        fit_mask_threshold(u, error, 1.5)


# --------------------------------------------------------------------------- end to end


def test_calibrate_end_to_end_and_cli(tiny_bundle, labelled_folder, tmp_path):
    """calibrate() and the CLI write new, loadable bundles with calibration and provenance; the input is untouched."""
    before = _digest(tiny_bundle)
    out = calibrate(tiny_bundle, labelled_folder, tmp_path / "calibrated", device="cpu", method="selective",
                    pixels_per_frame=500, steps=40, seed=3, progress=False)
    assert _digest(tiny_bundle) == before
    b = load_bundle(out)
    cal = b.config.calibration
    assert cal.method == "selective" and 1.0 <= cal.selective_temperature <= 100.0
    assert isinstance(b.model.selector, SelectiveScaler) and b.config.model.selector_hidden == 64
    prov = b.config.provenance["calibration"]
    assert prov["method"] == "selective" and prov["pixels"] == cal.fit["pixels"] <= 6 * 500
    assert prov["data"] == str(labelled_folder) and prov["threshold_rule"].startswith("max F0.5")
    for key in ("nll_before", "nll_after", "ece_before", "ece_after", "temperature_fit"):
        assert key in prov and key in cal.fit
    assert b.config.mask_threshold == prov["mask_threshold"]

    ev = run_evaluation(b.model, b.config, LabelledFolder(labelled_folder), torch.device("cpu"), progress=False)
    assert set(ev.calibration) == {"uncalibrated", "calibrated"}

    with pytest.raises(ValueError, match="never modifies its input"):
        calibrate(tiny_bundle, labelled_folder, tiny_bundle, device="cpu", progress=False)

    cli_out = tmp_path / "cli"
    assert cli_main(["calibrate", "--bundle", str(out), "--data", str(labelled_folder), "--out", str(cli_out),
                     "--method", "temperature", "--mask-target-fpr", "0.1", "--device", "cpu",
                     "--pixels-per-frame", "300", "--seed", "1"]) == 0
    c = load_bundle(cli_out)
    assert c.config.calibration.method == "temperature" and c.model.selector is None
    assert c.config.calibration.temperature == pytest.approx(c.config.calibration.fit["temperature_fit"])
    assert c.config.provenance["calibration"]["threshold_rule"] == "target false-positive rate 0.1"
    assert c.config.provenance["calibration"]["mask_fpr"] <= 0.1
    assert _digest(tiny_bundle) == before


# --------------------------------------------------------------------------- the fit as the authors do it (issue 16)


def test_temperature_fit_is_the_nll_minimum_and_respects_the_bounds():
    """LBFGS on log T lands on the minimum of a dense grid (spacing 1e-3 in log T, so within 0.1% in T);
    labels independent of the logits push T to the upper bound (the NLL falls towards uniform)."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(30_000, 5, generator=g) * 3.0
    labels = torch.multinomial((logits / 1.7).softmax(dim=1), 1, generator=g)[:, 0]
    grid = torch.arange(-1.0, 2.0, 1e-3).exp()
    best = float(grid[int(torch.tensor([nll(logits, labels, float(t)) for t in grid]).argmin())])
    assert fit_temperature(logits, labels) == pytest.approx(best, rel=2e-3)
    noise = torch.randint(0, 5, (30_000,), generator=g)
    assert fit_temperature(logits, noise) == pytest.approx(20.0)
    assert fit_temperature(logits * 1e-3, labels, bounds=(0.05, 20.0)) == pytest.approx(0.05), "needs sharpening beyond the bound"


def _frames_sample(frames: int = 10, per_frame: int = 2000):
    from uncertain_seg_training.calibration_fit import PixelSample

    logits, labels = _selective_split(frames * per_frame)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(5))
    logits, labels = logits[order], labels[order]
    frame = torch.arange(frames, dtype=torch.int32).repeat_interleave(per_frame)
    return PixelSample(logits, labels, torch.zeros(len(labels)), frame, frames)


def test_selector_is_fitted_on_early_frames_and_chosen_on_the_last():
    """With 3 selection frames the selector is one of the checkpoints of a selector trained on frames 0-6
    alone, and T_sel is the NLL-optimal temperature of its flagged pixels in frames 7-9."""
    from uncertain_seg_training.calibration_fit import SelectorOptions, fit_selective

    sample = _frames_sample()
    fit = fit_selective(sample, 1.3, SelectorOptions(val_frames=3, hidden=16, steps=60, seed=4), progress=False)
    early, late = sample.split(7)
    assert (early.frames, late.frames, len(late.labels)) == (7, 3, 6000)
    checkpoints = dict(train_selector(early.logits, early.labels, hidden=16, steps=60, seed=4, progress=False, checkpoints=10))
    assert sorted(checkpoints) == [6, 12, 18, 24, 30, 36, 42, 48, 54, 60] and fit.info["chosen_step"] in checkpoints
    chosen = checkpoints[fit.info["chosen_step"]]
    assert all(torch.equal(a, b) for a, b in zip(chosen.state_dict().values(), fit.selector.state_dict().values()))
    flagged = selector_scores(chosen, late.logits) > 0
    assert fit.selective_temperature == fit_selective_temperature(late.logits, late.labels, flagged)
    assert fit.info["fit_frames"] == 7 and fit.info["selection_frames"] == 3


def test_selector_weighting_options():
    """balanced: a misclassified pixel weighs n_correct / n_wrong; duplicate (the authors'): 2. Weighting
    the errors less flags fewer pixels on the same data."""
    from uncertain_seg_training.calibration_fit import SelectorOptions, fit_selective, misprediction_weight

    errors = torch.tensor([True, False, False, False])
    assert misprediction_weight(errors, "balanced") == 3.0 and misprediction_weight(errors, "duplicate") == 2.0
    with pytest.raises(ValueError, match="weighting"):
        misprediction_weight(errors, "triple")
    sample = _frames_sample()
    balanced = fit_selective(sample, 1.0, SelectorOptions(weighting="balanced", hidden=16, steps=80), progress=False)
    duplicate = fit_selective(sample, 1.0, SelectorOptions(weighting="duplicate", hidden=16, steps=80), progress=False)
    assert balanced.info["misprediction_weight"] == misprediction_weight(sample.errors, "balanced") > 2.0
    assert duplicate.info["misprediction_weight"] == 2.0
    assert duplicate.info["flagged_fraction"] <= balanced.info["flagged_fraction"]


def test_selective_scaling_sits_on_temperature_scaling():
    """Unflagged pixels are divided by T, flagged ones by T_sel (an old bundle's T = 1 leaves them as they were)."""
    torch.manual_seed(1)
    logits = torch.randn(1, 3, 4, 5) * 3
    selector = SelectiveScaler(3, 4).eval()
    flagged = selector(logits)[:, 0] > 0
    out = Calibration(method="selective", temperature=2.0, selective_temperature=9.0).apply(logits, flagged)
    torch.testing.assert_close(out, torch.where(flagged[:, None], logits / 9.0, logits / 2.0), rtol=0, atol=0)
