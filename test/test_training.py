"""Training: data layout, augmentation, losses, batch order, exact resume, torchrun DDP, evaluate CLI."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from uncertain_seg_ros.bundle import load_bundle
from uncertain_seg_training.augment import AugmentConfig, sample_rng, train_transform
from uncertain_seg_training.cli import main as cli_main
from uncertain_seg_training.datasets import LabelledFolder, find_classes_file
from uncertain_seg_training.losses import class_weights, ranking_loss
from uncertain_seg_training.train import StepBatches, lr_factor, TrainConfig

from conftest import stopped_and_resumed, write_labelled_folder

TINY = ["--backbone", "demo_vitt14", "--from-scratch", "--input-size", "42", "56", "--batch-size", "2", "--workers", "0", "--log-every", "1",
        "--uncertainty-hidden", "16", "--n-last-blocks", "2", "--warmup-steps", "2"]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


def test_generic_layout_and_classes_lookup(tmp_path):
    """images/ + labels/ pair by stem; classes.yaml is found in the folder or a parent (CamVid layout)."""
    root = write_labelled_folder(tmp_path / "ds" / "train", n=3)
    shutil.move(str(root / "classes.yaml"), tmp_path / "ds" / "classes.yaml")
    (root / "images" / "unlabelled.png").write_bytes((root / "images" / "f000.png").read_bytes())
    folder = LabelledFolder(root)
    assert len(folder) == 3 and folder.classes.ignore_index == 255
    assert [c.name for c in folder.classes.classes] == ["sky", "road", "car"]
    assert find_classes_file(root) == tmp_path / "ds" / "classes.yaml"
    image, label = folder.read(0)
    assert image.shape == (60, 80, 3) and image.dtype == np.uint8 and label.shape == (60, 80)
    assert folder.class_frequencies().sum() == 3 * 59 * 80


def test_missing_layout_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="images/ and labels/"):
        LabelledFolder(tmp_path)


def test_augmentation_is_a_function_of_seed_epoch_index():
    """Same (seed, epoch, index) -> same crop; output has the network size; padding is ignore."""
    image = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    label = np.ones((30, 40), np.int64)
    cfg = AugmentConfig(scale_min=0.5, scale_max=0.5)
    a = train_transform(image, label, (42, 56), sample_rng(1, 2, 3), cfg, -100)
    b = train_transform(image, label, (42, 56), sample_rng(1, 2, 3), cfg, -100)
    c = train_transform(image, label, (42, 56), sample_rng(1, 3, 3), AugmentConfig(), -100)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert a[0].shape == (42, 56, 3) and a[1].shape == (42, 56) and c[0].shape == (42, 56, 3)
    assert (a[1] == -100).any() and set(np.unique(a[1])) <= {1, -100}


def test_class_weights_hand_worked():
    """inverse_sqrt of frequencies (0.64, 0.36, 0): 1/0.8 and 1/0.6, normalised to mean 1; unseen -> 0."""
    w = class_weights(np.array([64, 36, 0]), "inverse_sqrt").numpy()
    expected = np.array([1.25, 1 / 0.6]) / np.mean([1.25, 1 / 0.6])
    assert np.allclose(w[:2], expected) and w[2] == 0
    assert class_weights(np.array([1, 1]), "none") is None
    m = class_weights(np.array([75, 25]), "median_frequency").numpy()
    assert np.allclose(m, np.array([0.5 / 0.75, 0.5 / 0.25]) / np.mean([0.5 / 0.75, 0.5 / 0.25]))


def test_ranking_loss_hand_worked():
    """Correctly ordered with a gap > margin -> 0; reversed by d -> margin + d; ties in l cost the margin."""
    l = torch.tensor([0.0, 1.0])
    valid = torch.tensor([True, True])
    g = torch.Generator().manual_seed(0)
    assert ranking_loss(torch.tensor([0.0, 0.5]), l, valid, pairs=64, generator=g).item() == pytest.approx(
        0.1 * ranking_pair_ties(64))
    idx = torch.randint(0, 2, (2, 64), generator=torch.Generator().manual_seed(0))
    reversed_loss = ranking_loss(torch.tensor([0.3, 0.0]), l, valid, pairs=64, generator=torch.Generator().manual_seed(0))
    ties = (idx[0] == idx[1]).float()
    assert reversed_loss.item() == pytest.approx((ties * 0.1 + (1 - ties) * 0.4).mean().item())
    assert ranking_loss(torch.tensor([0.5]), torch.tensor([1.0]), torch.tensor([True])).item() == 0.0


def ranking_pair_ties(pairs: int) -> float:
    idx = torch.randint(0, 2, (2, pairs), generator=torch.Generator().manual_seed(0))
    return (idx[0] == idx[1]).float().mean().item()


def test_step_batches_partition_and_resume():
    """Ranks split each global batch without overlap; starting at step s yields the same later batches."""
    full = [list(StepBatches(10, 2, 2, r, seed=0, start=0, steps=5)) for r in range(2)]
    items = [item for step in range(5) for r in range(2) for item in full[r][step]]
    assert len(items) == 20 and len(set(items)) == 20
    for epoch in (0, 1):
        assert sorted(i for i, e in items if e == epoch) == list(range(10))
    assert list(StepBatches(10, 2, 2, 1, seed=0, start=3, steps=5)) == full[1][3:]


def test_lr_schedule():
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0) and lr_factor(100, cfg) == pytest.approx(0.1)


def test_train_resume_is_exact_and_evaluate_reports(labelled_folder, tmp_path, capsys):
    """A run stopped at step 2 and resumed equals an uninterrupted run bit for bit; evaluate writes the report."""
    args = ["train", "--data", str(labelled_folder), "--steps", "4", "--drop-path", "0.1", *TINY]
    assert cli_main([*args, "--out", str(tmp_path / "full")]) == 0
    assert cli_main([*args, "--out", str(tmp_path / "part"), "--stop-after", "2"]) == 0
    assert not (tmp_path / "part" / "bundle").exists()
    assert json.loads((tmp_path / "part" / "checkpoint" / "state.json").read_text())["step"] == 2
    assert cli_main([*args, "--out", str(tmp_path / "part"), "--resume"]) == 0
    a = load_file(str(tmp_path / "full" / "bundle" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "bundle" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = [json.loads(x) for x in (tmp_path / "part" / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in logs] == [1, 2, 3, 4]

    bundle = load_bundle(tmp_path / "full" / "bundle")
    prov = bundle.config.provenance
    assert prov["steps"] == 4 and prov["data"]["train"] == str(labelled_folder) and prov["processes"] == 1
    assert bundle.config.ignore_index == 255 and bundle.config.input.height == 42

    out = tmp_path / "report"
    capsys.readouterr()
    assert cli_main(["evaluate", "--bundle", str(tmp_path / "full" / "bundle"), "--data", str(labelled_folder),
                     "--out", str(out), "--device", "cpu", "--montage", "2"]) == 0
    assert "mIoU" in capsys.readouterr().out
    for name in ("metrics.json", "report.md", "reliability.png", "pr_curves.png", "montage.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["frames"] == 6 and 0 <= metrics["miou"] <= 1
    assert set(metrics["uncertainty"]) == {"max_softmax", "entropy", "learned"}
    assert metrics["model_id"] == bundle.model_id


def test_torchrun_two_processes_gloo(labelled_folder, tmp_path):
    """A real 2-process torchrun job (gloo on CPU) trains, validates and exports one bundle."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    out = tmp_path / "ddp"
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "uncertain_seg_training.cli", "train",
           "--data", str(labelled_folder), "--val-data", str(labelled_folder), "--val-every", "3",
           "--steps", "3", "--out", str(out), "--device", "cpu", *TINY]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    bundle = load_bundle(out / "bundle")
    assert bundle.config.provenance["processes"] == 2 and bundle.config.provenance["batch_size"] == 4
    logs = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in logs if "loss" in x] == [1, 2, 3]
    assert any("val_miou" in x for x in logs)


def test_cli_help_explains_commands(capsys):
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    text = capsys.readouterr().out
    assert "train" in text and "evaluate" in text and "torchrun" in text
    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--resume", "--pretrained", "--backbone-lr-mult", "--class-weighting", "--amp", "--stop-after"):
        assert flag in text


def test_continued_training_with_random_masking_trains_the_token_and_resumes_exactly(labelled_folder, tmp_path):
    """--init-bundle continues a bundle (architecture, input size and, with --class-weighting source, its
    weighting); --mask-ratio-max trains the mask token (zero and frozen without masking); stopped and
    resumed equals uninterrupted, masks included; provenance names the starting bundle."""
    first = tmp_path / "first"
    assert cli_main(["train", "--data", str(labelled_folder), "--steps", "2", "--class-weighting", "inverse_sqrt",
                     "--out", str(first), *TINY]) == 0
    start = load_file(str(first / "bundle" / "model.safetensors"))
    assert not start["backbone.mask_token"].any(), "no masking: the token is never trained"
    args = ["train", "--data", str(labelled_folder), "--init-bundle", str(first / "bundle"), "--steps", "4",
            "--mask-ratio-max", "0.5", "--class-weighting", "source", "--mask-token-lr-mult", "10", "--batch-size", "2",
            "--workers", "0", "--warmup-steps", "1"]
    a, b = stopped_and_resumed(cli_main, args, tmp_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["backbone.mask_token"].abs().max() > 0
    bundle = load_bundle(tmp_path / "full" / "bundle")
    prov = bundle.config.provenance
    assert prov["stage"] == "supervised (continued)" and prov["class_weighting"] == "inverse_sqrt"
    assert prov["init_bundle"]["model_id"] == load_bundle(first / "bundle").model_id
    assert prov["previous"]["steps"] == 2 and prov["mask_ratio_max"] == 0.5
    assert (bundle.config.input.height, bundle.config.input.width) == (42, 56), "the input size is the bundle's"


def test_random_ratio_masks():
    """Per-image ratios: each row masks round(r_i * n) patches; a ratio outside [0, 1] is refused."""
    from uncertain_seg_training.masking import mask_generator, random_patch_mask, random_ratio_mask

    mask = random_patch_mask(3, (4, 5), torch.tensor([0.0, 0.5, 1.0]), torch.device("cpu"), mask_generator(0, 0))
    assert mask.sum(1).tolist() == [0, 10, 20]
    again = random_ratio_mask(8, (4, 5), 0.5, torch.device("cpu"), mask_generator(1, 7))
    assert torch.equal(again, random_ratio_mask(8, (4, 5), 0.5, torch.device("cpu"), mask_generator(1, 7)))
    assert (again.sum(1) <= 10).all() and again.sum() > 0
    with pytest.raises(ValueError, match="mask ratios"):
        random_patch_mask(1, (2, 2), 1.5, torch.device("cpu"))


def test_dusk_transform_is_deterministic_darker_and_bluer():
    """Same seed -> same frame; another seed -> other noise only; darker (mid-tones most), blue-shifted."""
    from uncertain_seg_training.photometric import DuskParams, dusk_transform

    rng = np.random.default_rng(0)
    day = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    day[..., 0] = day[..., 2] = day[..., 1]  # grey input: any colour cast comes from the transform
    a, b, c = dusk_transform(day, [3, 1]), dusk_transform(day, [3, 1]), dusk_transform(day, [3, 2])
    assert a.dtype == np.uint8 and a.shape == day.shape
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    clean = dusk_transform(day, 0, DuskParams(noise_sigma=0.0))
    assert np.abs(a.astype(int) - clean).max() <= 4 * 3 + 1, "noise of sigma 3 grey levels, nothing else varies with the seed"
    assert clean.mean() < 0.6 * day.mean(), "uniform grey levels: E[0.72 x^1.6] / E[x] = 0.55"
    mid = (day[..., 1] > 100) & (day[..., 1] < 150)
    top = day[..., 1] > 240
    assert clean[mid, 1].mean() / day[mid, 1].mean() < clean[top, 1].mean() / day[top, 1].mean(), "gamma darkens mid-tones most"
    r, g, bl = (clean[..., k].astype(float).sum() for k in range(3))
    assert r < g < bl, "less red, more blue"
    with pytest.raises(ValueError, match="uint8"):
        dusk_transform(day.astype(np.float32), 0)
