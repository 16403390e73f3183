"""Adaptation: the Masked gamma-SSL loss and gamma rule, patch masks, EMA, and `adapt` end to end from a real bag."""
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from uncertain_seg_ros.bags import write_image_bag
from uncertain_seg_ros.bundle import load_bundle, save_bundle
from uncertain_seg_ros.model import UncertainSegmenter
from uncertain_seg_training.adapt import ema_update, gamma_ssl_loss, multiscale_pseudo_labels
from uncertain_seg_training.masking import random_patch_mask
from uncertain_seg_training.cli import main as cli_main

from conftest import stopped_and_resumed, tiny_bundle_config

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
    config.provenance = {"stage": "supervised", "train_config": {"class_weighting": "inverse_sqrt"}}
    torch.manual_seed(0)
    return save_bundle(tmp_path / "source", UncertainSegmenter(config.model), config)


def test_adapt_from_bag_resumes_exactly(source_bundle, labelled_folder, target_bag, tmp_path):
    """gamma-SSL + MaskMatch from a rosbag2: stopped and resumed equals uninterrupted; provenance names the bag."""
    args = ["adapt", "--bundle", str(source_bundle), "--data", str(labelled_folder), "--target-bags", str(target_bag),
            "--method", "both", "--steps", "4", "--dedupe", "0", *TINY]
    a, b = stopped_and_resumed(cli_main, args, tmp_path)
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


# --------------------------------------------------------------------------- the loop's fixes (issue 16)


def _adapt_args(bundle, data, out, *extra):
    return ["adapt", "--bundle", str(bundle), "--data", str(data), "--out", str(out), "--dedupe", "0", *TINY, *extra]


def test_mask_token_is_optimised_with_a_frozen_backbone(source_bundle, labelled_folder, target_bag, tmp_path):
    """--backbone-lr-mult 0: the token is in the optimiser (its own group) and moves; the rest of the
    backbone stays exactly as it was, the heads train."""
    from uncertain_seg_training.adapt import AdaptConfig
    from uncertain_seg_training.train import param_groups

    model = load_bundle(source_bundle).model
    model.backbone.requires_grad_(False)
    model.backbone.mask_token.requires_grad_(True)
    groups = param_groups(model, AdaptConfig(backbone_lr_mult=0.0, mask_token_lr_mult=3.0))
    token_groups = [g for g in groups if any(p is model.backbone.mask_token for p in g["params"])]
    assert len(token_groups) == 1 and token_groups[0]["lr_mult"] == 3.0 and token_groups[0]["weight_decay"] == 0.0
    assert not any(p is q for g in groups for p in g["params"] for q in model.backbone.parameters() if q is not model.backbone.mask_token)

    out = tmp_path / "frozen"
    assert cli_main([*_adapt_args(source_bundle, labelled_folder, out, "--target-bags", str(target_bag)),
                     "--method", "gamma_ssl", "--steps", "3", "--backbone-lr-mult", "0", "--lr", "1e-2"]) == 0
    before, after = load_file(str(source_bundle / "model.safetensors")), load_file(str(out / "bundle" / "model.safetensors"))
    assert not torch.equal(before["backbone.mask_token"], after["backbone.mask_token"])
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("backbone.") and k != "backbone.mask_token")
    assert not torch.equal(before["head.conv.weight"], after["head.conv.weight"])


def test_batchnorm_statistics_do_not_move_during_adaptation(source_bundle, labelled_folder, target_bag, tmp_path):
    """Masked target batches and source batches never update the running statistics (eval-mode BatchNorm)."""
    out = tmp_path / "both"
    assert cli_main([*_adapt_args(source_bundle, labelled_folder, out, "--target-bags", str(target_bag)),
                     "--method", "both", "--steps", "3"]) == 0
    before, after = load_file(str(source_bundle / "model.safetensors")), load_file(str(out / "bundle" / "model.safetensors"))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(before[f"head.bn.{name}"], after[f"head.bn.{name}"]), name
    assert not torch.equal(before["head.bn.weight"], after["head.bn.weight"]), "the affine BatchNorm parameters still train"


def test_class_weighting_is_carried_from_the_source_bundle(source_bundle, labelled_folder, tmp_path, capsys):
    """By default the source loss uses the input bundle's weighting (from its provenance); an explicit
    choice wins; a bundle whose provenance does not say is refused with a message naming the option."""
    out = tmp_path / "control"
    assert cli_main([*_adapt_args(source_bundle, labelled_folder, out), "--method", "control", "--steps", "1"]) == 0
    prov = load_bundle(out / "bundle").config.provenance
    assert prov["class_weighting"] == "inverse_sqrt" and prov["adapt_config"]["class_weighting"] == "source"
    assert prov["target"]["frames"] == 0, "the control reads no target frames"
    assert not any("consistency" in json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines())
    assert cli_main([*_adapt_args(out / "bundle", labelled_folder, tmp_path / "again"), "--method", "control", "--steps", "1"]) == 0
    assert load_bundle(tmp_path / "again" / "bundle").config.provenance["class_weighting"] == "inverse_sqrt", "found through previous"
    assert cli_main([*_adapt_args(source_bundle, labelled_folder, tmp_path / "none"), "--method", "control", "--steps", "1",
                     "--class-weighting", "none"]) == 0
    assert load_bundle(tmp_path / "none" / "bundle").config.provenance["class_weighting"] == "none"

    config = tiny_bundle_config()
    unknown = save_bundle(tmp_path / "unknown", UncertainSegmenter(config.model), config)
    assert cli_main([*_adapt_args(unknown, labelled_folder, tmp_path / "refused"), "--method", "control", "--steps", "1"]) == 2
    assert "pass --class-weighting" in capsys.readouterr().err


def test_target_and_query_branches_compute_the_same_function(labelled_folder, target_bag, tmp_path):
    """With nothing masked and no colour jitter, the query branch at step 1 is exactly the target branch,
    even with drop-path 0.5 and BatchNorm in the model: the logged disagreement is 0 (train mode gave
    the query batch statistics and dropped paths)."""
    base = tiny_bundle_config()
    config = replace(base, model=replace(base.model, backbone=replace(base.model.backbone, drop_path_rate=0.5)))
    config.provenance = {"class_weighting": "none"}
    torch.manual_seed(0)
    bundle = save_bundle(tmp_path / "droppy", UncertainSegmenter(config.model), config)
    out = tmp_path / "same"
    assert cli_main([*_adapt_args(bundle, labelled_folder, out, "--target-bags", str(target_bag)), "--method", "gamma_ssl",
                     "--steps", "1", "--mask-ratio", "0", "--color-jitter", "0"]) == 0
    first = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])
    assert first["disagreement"] == 0.0 and first["certain"] > 0


def test_query_view_has_its_own_colour_jitter(labelled_folder):
    """The views differ in colour; without jitter they are equal, so they share the crop and flip."""
    from uncertain_seg_training.adapt import TargetSet
    from uncertain_seg_training.augment import AugmentConfig

    images = sorted((labelled_folder / "images").iterdir())
    target, query, valid = TargetSet(images, (56, 70), AugmentConfig(scale_min=0.5, scale_max=0.5), seed=0)[(1, 0)]
    assert target.shape == query.shape == (56, 70, 3) and valid.shape == (56, 70) and not valid.all()
    assert (target.float() - query.float()).abs().mean() > 1.0
    plain = AugmentConfig(scale_min=0.5, scale_max=0.5, brightness=0.0, contrast=0.0, saturation=0.0)
    target, query, _ = TargetSet(images, (56, 70), plain, seed=0)[(1, 0)]
    assert torch.equal(target, query)


def test_bn_stats_reestimates_batchnorm_on_the_target_frames_only(source_bundle, target_bag, labelled_folder, tmp_path):
    """--method bn_stats: the head's BatchNorm statistics become the exact mean / unbiased variance of its
    inputs over the whole target frames at the input size; no other weight changes; no source data needed."""
    from uncertain_seg_ros.image_files import read_rgb
    from uncertain_seg_ros.preprocessing import to_input

    out = tmp_path / "bn"
    assert cli_main(["adapt", "--bundle", str(source_bundle), "--target-bags", str(target_bag), "--method", "bn_stats",
                     "--dedupe", "0", "--out", str(out), "--device", "cpu"]) == 0
    source, adapted = load_bundle(source_bundle), load_bundle(out / "bundle")
    cfg = source.config
    feats = []
    with torch.no_grad():
        for path in sorted(labelled_folder.joinpath("images").iterdir()):
            x = to_input(torch.from_numpy(read_rgb(path))[None], (cfg.input.height, cfg.input.width), cfg.input.mean, cfg.input.std)
            feats.append(source.model.features(x))
    f = torch.cat(feats).transpose(0, 1).flatten(1).double()
    bn = adapted.model.head.bn
    # float32 features summed in float64: the statistics agree to float32 rounding of the features
    torch.testing.assert_close(bn.running_mean.double(), f.mean(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), f.var(1), rtol=1e-5, atol=1e-6)
    a, b = source.model.state_dict(), adapted.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("head.bn.running") and "num_batches" not in k)
    assert adapted.config.provenance["stage"] == "adaptation (bn_stats)" and adapted.config.provenance["target"]["frames"] == 6
