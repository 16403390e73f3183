"""Adaptation: the Masked gamma-SSL loss and gamma rule, patch masks, EMA, and `adapt` end to end from a real bag."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from uncertain_seg_ros.bags import write_image_bag
from uncertain_seg_ros.bundle import load_bundle, save_bundle
from uncertain_seg_ros.model import UncertainSegmenter
from uncertain_seg_training.adapt import ema_update, gamma_ssl_loss, multiscale_pseudo_labels, random_patch_mask
from uncertain_seg_training.cli import main as cli_main

from conftest import tiny_bundle_config

TINY = ["--batch-size", "2", "--workers", "0", "--log-every", "1", "--warmup-steps", "1", "--tau", "1.0"]


def test_gamma_ssl_identical_branches_keep_every_pixel():
    """No disagreement -> gamma is the lowest confidence, no pixel is excluded, loss = entropy of p."""
    logits = torch.randn(2, 4, 5, 6)
    valid = torch.ones(2, 5, 6, dtype=torch.bool)
    loss, info = gamma_ssl_loss(logits, logits.clone(), valid, tau=1.0)
    p = logits.softmax(1)
    assert info["disagreement"] == 0.0 and info["certain"] == 1.0
    assert loss.item() == pytest.approx(-(p * p.log()).sum(1).mean().item(), rel=1e-5)


def test_gamma_excludes_exactly_the_disagreement_fraction():
    """Branches disagree on 1 pixel of 4: gamma excludes the 1 least confident query pixel, not the others."""
    target = torch.tensor([[[[5.0, 5.0, 5.0, 5.0]], [[0.0, 0.0, 0.0, 0.0]]]])
    query = torch.tensor([[[[4.0, 3.0, 2.0, -1.0]], [[0.0, 0.0, 0.0, 0.0]]]])
    valid = torch.ones(1, 1, 4, dtype=torch.bool)
    loss, info = gamma_ssl_loss(target, query, valid, tau=1.0)
    assert info["disagreement"] == pytest.approx(0.25)
    assert info["certain"] == pytest.approx(0.75)
    p_t, log_q = target.softmax(1), query.log_softmax(1)
    ce = -(p_t * log_q).sum(1)[0, 0]
    assert loss.item() == pytest.approx(ce[:3].mean().item(), rel=1e-5)


def test_invalid_pixels_never_count():
    logits = torch.randn(1, 3, 4, 4)
    valid = torch.zeros(1, 4, 4, dtype=torch.bool)
    loss, info = gamma_ssl_loss(logits, torch.randn(1, 3, 4, 4), valid, tau=0.1)
    assert loss.item() == 0.0 and info["certain"] == 0.0


def test_random_patch_mask_counts():
    mask = random_patch_mask(3, (4, 5), 0.5, torch.device("cpu"))
    assert mask.shape == (3, 20) and mask.sum(1).tolist() == [10, 10, 10]


def test_ema_update():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    expected = 0.9 * a.weight.detach().clone() + 0.1 * b.weight.detach()
    ema_update(a, b, 0.9)
    assert torch.allclose(a.weight, expected)


def test_multiscale_pseudo_labels_shape_and_threshold():
    model = UncertainSegmenter(tiny_bundle_config().model).eval()
    x = torch.randn(2, 3, 56, 70)
    labels, confident = multiscale_pseudo_labels(model, x, (0.75, 1.0, 1.25), 0.0, 14)
    assert labels.shape == (2, 56, 70) and confident.all()
    _, none = multiscale_pseudo_labels(model, x, (1.0,), 1.01, 14)
    assert not none.any()


@pytest.fixture
def target_bag(labelled_folder, tmp_path):
    return write_image_bag(labelled_folder / "images", tmp_path / "site_bag", topic="/front/image_raw", fps=5)


@pytest.fixture
def source_bundle(tmp_path):
    config = tiny_bundle_config()
    torch.manual_seed(0)
    return save_bundle(tmp_path / "source", UncertainSegmenter(config.model), config)


def test_adapt_from_bag_resumes_exactly(source_bundle, labelled_folder, target_bag, tmp_path):
    """gamma-SSL + MaskMatch from a rosbag2: stopped and resumed equals uninterrupted; provenance names the bag."""
    args = ["adapt", "--bundle", str(source_bundle), "--data", str(labelled_folder), "--target-bags", str(target_bag),
            "--method", "both", "--steps", "4", "--dedupe", "0", *TINY]
    assert cli_main([*args, "--out", str(tmp_path / "full")]) == 0
    assert cli_main([*args, "--out", str(tmp_path / "part"), "--stop-after", "2"]) == 0
    assert cli_main([*args, "--out", str(tmp_path / "part"), "--resume"]) == 0
    a = load_file(str(tmp_path / "full" / "bundle" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "bundle" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    source = load_file(str(source_bundle / "model.safetensors"))
    assert not torch.equal(a["backbone.mask_token"], source["backbone.mask_token"]), "the mask token is trained"
    bundle = load_bundle(tmp_path / "full" / "bundle")
    prov = bundle.config.provenance
    assert prov["target"]["bags"] == [str(target_bag)] and prov["target"]["frames"] == 6
    assert prov["input_bundle"]["model_id"] == load_bundle(source_bundle).model_id
    assert prov["stage"] == "adaptation (both)" and bundle.config.name == "tiny-adapted"
    logs = [json.loads(x) for x in (tmp_path / "full" / "train_log.jsonl").read_text().splitlines()]
    assert all({"consistency", "gamma", "maskmatch", "pseudo_fraction"} <= set(x) for x in logs)


def test_adapt_without_target_frames_is_an_error(source_bundle, labelled_folder, tmp_path, capsys):
    assert cli_main(["adapt", "--bundle", str(source_bundle), "--data", str(labelled_folder), "--out", str(tmp_path), *TINY]) == 2
    assert capsys.readouterr().err.strip() == ("uncertain-seg adapt: error: no target frames: give --target-bags and/or "
                                               "--target-images")


def test_adapt_torchrun_two_processes(source_bundle, labelled_folder, target_bag, tmp_path):
    """Two gloo processes adapt with DDP (one forward per step over source + masked target) and export one bundle."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    out = tmp_path / "ddp"
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "uncertain_seg_training.cli", "adapt",
           "--bundle", str(source_bundle), "--data", str(labelled_folder), "--target-bags", str(target_bag),
           "--method", "gamma_ssl", "--steps", "2", "--out", str(out), "--device", "cpu", *TINY]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert load_bundle(out / "bundle").config.provenance["processes"] == 2


def test_adapt_and_calibrate_cli_on_the_dusk_rosbag2(tmp_path):
    """The user's path on real data: the shipped day model adapted from a rosbag2 of CamVid dusk frames
    (samples/camvid_dusk_bag, written by `uncertain-seg bag write`), then calibrated on labelled dusk
    frames, all through the command line; the result loads with its selector and provenance."""
    from conftest import REPO

    bag, labelled = REPO / "samples" / "camvid_dusk_bag", REPO / "samples" / "camvid_dusk"
    adapted = tmp_path / "adapt"
    assert cli_main(["adapt", "--bundle", "camvid_day", "--data", str(labelled), "--target-bags", str(bag),
                     "--target-topic", "/camera/image_raw", "--dedupe", "0", "--method", "both", "--steps", "2", "--device", "cpu",
                     "--out", str(adapted), *TINY]) == 0
    prov = load_bundle(adapted / "bundle").config.provenance
    assert prov["target"]["bags"] == [str(bag)] and prov["target"]["frames"] == 5
    assert prov["input_bundle"]["model_id"] == load_bundle(REPO / "models" / "camvid_day").model_id
    calibrated = tmp_path / "site_model"
    assert cli_main(["calibrate", "--bundle", str(adapted / "bundle"), "--data", str(labelled), "--out", str(calibrated),
                     "--method", "selective", "--device", "cpu", "--pixels-per-frame", "2000", "--selector-steps", "50"]) == 0
    b = load_bundle(calibrated)
    assert b.config.calibration.method == "selective" and b.model.selector is not None
    assert b.config.provenance["stage"] == "adaptation (both)" and "calibration" in b.config.provenance
