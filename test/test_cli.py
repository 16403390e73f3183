"""``uncertain-seg`` as a user meets it: help that lists what exists, quickly; one-line errors; no silent choices."""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from uncertain_seg_training.cli import build_parser, main as cli_main

from conftest import REPO, installed_script

TRAIN = ["--backbone", "demo_vitt14", "--input-size", "42", "56", "--batch-size", "2", "--workers", "0",
         "--uncertainty-hidden", "16", "--n-last-blocks", "2", "--warmup-steps", "1", "--steps", "1", "--device", "cpu"]


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every command and sub-command parser, by its words (("bag", "info"), ...)."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[(*prefix, name)] = sub
                found.update(_commands(sub, (*prefix, name)))
    return found


def test_help_lists_every_command_and_every_bag_subcommand():
    """The top-level help once left out record and benchmark, bag's left out play."""
    parser = build_parser()
    commands = _commands(parser)
    top = parser.format_help()
    for words in commands:
        if len(words) == 1:
            assert re.search(rf"^\s+{words[0]}\b", top, re.M), words
    bag = commands[("bag",)].format_help()
    for sub in ("info", "extract", "write", "play"):
        assert ("bag", sub) in commands and re.search(rf"^\s+{sub}\b", bag, re.M), sub
    assert {("train",), ("adapt",), ("evaluate",), ("calibrate",), ("build-engine",), ("record",), ("demo",),
            ("benchmark",)} <= set(commands)


def test_every_command_the_readme_shows_exists():
    commands = _commands(build_parser())
    shown = set(re.findall(r"uncertain-seg ((?:bag )?[a-z][a-z-]+)", (REPO / "README.md").read_text()))
    assert shown and all(tuple(s.split()) in commands for s in shown), sorted(s for s in shown if tuple(s.split()) not in commands)


def test_no_option_help_has_an_empty_or_doubled_default():
    """train --help printed "(default: )" for empty strings and "(default: ...) (default: )" for --name."""
    for words, parser in _commands(build_parser()).items():
        text = parser.format_help()
        assert "(default: )" not in text, words
        for action in parser._actions:
            assert (action.help or "").count("(default") <= 1, (words, action.dest, action.help)
    text = " ".join(_commands(build_parser())[("train",)].format_help().split())
    assert "(default: 476 644)" in text and "largest random scale" in text and "--from-scratch" in text


@pytest.mark.parametrize("argv", [[], ["bag"], ["bag", "info"], ["bag", "play"], ["evaluate"], ["record"], ["demo"]],
                         ids=lambda a: " ".join(a) or "top")
def test_help_does_not_import_torch(argv):
    """--help took ~3 s importing torch; a command's options are now added only when it is used. (train, adapt,
    calibrate, build-engine and benchmark still import it for their --help: their options come from torch modules.)"""
    code = ("import sys\nfrom uncertain_seg_training.cli import main\ntry:\n    main(sys.argv[1:] + ['--help'])\n"
            "except SystemExit:\n    pass\nprint('TORCH' if 'torch' in sys.modules else 'NO TORCH', file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert proc.stderr.strip().splitlines()[-1] == "NO TORCH" and "usage: uncertain-seg" in proc.stdout


def test_errors_are_one_line_with_exit_code_2_and_the_traceback_with_debug(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert cli_main(["train", "--data", str(missing), "--from-scratch", "--out", str(tmp_path / "r"), *TRAIN]) == 2
    assert capsys.readouterr().err == f"uncertain-seg train: error: labelled folder {missing} does not exist\n"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli_main(["train", "--data", str(missing), "--from-scratch", "--out", str(tmp_path / "r"), *TRAIN, "--debug"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli_main(["--debug", "evaluate", "--bundle", "camvid_demo", "--data", str(missing), "--out", str(tmp_path / "e")])
    capsys.readouterr()
    (tmp_path / "images").mkdir()
    assert cli_main(["calibrate", "--bundle", "camvid_demo", "--data", str(tmp_path), "--out", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err.startswith(f"uncertain-seg calibrate: error: labelled folder {tmp_path} has no labels/ folder")


def test_train_errors_of_the_issue_are_one_line(labelled_folder, tmp_path):
    """Input size not a multiple of 14, and --download-pretrained offline (an HTTPS proxy on loopback that refuses
    connections makes any machine offline for this process; an empty TORCH_HOME holds no cached copy)."""
    cli = installed_script()
    cases = [
        (["--from-scratch", "--input-size", "40", "56"], "input size 40x56 must be positive multiples of 14"),
        (["--download-pretrained", "--backbone", "dinov2_vits14"], "When offline, download the file elsewhere"),
    ]
    for extra, message in cases:
        args = [cli, "train", "--data", str(labelled_folder), "--out", str(tmp_path / "r"), *TRAIN, *extra]
        if "--download-pretrained" in extra:
            args.remove("demo_vitt14")
            args.remove("--backbone")
        env = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
        env.update(OMP_NUM_THREADS="1", https_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9",
                   TORCH_HOME=str(tmp_path / "torch_home"))
        proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert lines[-1].startswith("uncertain-seg train: error: ") and message in lines[-1], lines
        assert "Traceback" not in proc.stderr


def test_missing_extra_is_named_in_one_line(tmp_path):
    """evaluate after README command 1 (no [train] extra) crashed with ModuleNotFoundError: matplotlib. Here
    matplotlib is made unimportable the way Python marks a module missing (sys.modules entry None)."""
    code = ("import sys\nsys.modules['matplotlib'] = None\nfrom uncertain_seg_training.cli import main\n"
            "sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "evaluate", "--bundle", "camvid_demo", "--data",
                           str(REPO / "samples" / "camvid_dusk"), "--out", str(tmp_path / "e"), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ('uncertain-seg evaluate: error: matplotlib is not installed; the [train] extra installs '
                                   'it: pip install -e ".[train]" in the clone, or pip install "matplotlib>=3.6"')


def test_train_requires_a_source_of_weights(labelled_folder, tmp_path, capsys):
    """The default dinov2_vits14 without --pretrained trained from random weights, silently."""
    base = ["train", "--data", str(labelled_folder), "--out", str(tmp_path / "r"), *TRAIN]
    assert cli_main(base) == 2
    assert "would start from random weights" in capsys.readouterr().err
    assert cli_main([*base, "--from-scratch", "--pretrained", "x.pth"]) == 2
    assert "--pretrained and --from-scratch contradict each other" in capsys.readouterr().err
    assert cli_main([*base, "--init-bundle", "camvid_day", "--pretrained", "x.pth"]) == 2
    assert "--pretrained and --init-bundle contradict each other" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_train_refuses_to_overwrite_a_previous_run(labelled_folder, tmp_path, capsys):
    out = tmp_path / "r"
    args = ["train", "--data", str(labelled_folder), "--out", str(out), "--from-scratch", *TRAIN]
    assert cli_main(args) == 0 and (out / "bundle").is_dir()
    first = (out / "bundle" / "checksums.sha256").read_text()
    capsys.readouterr()
    assert cli_main(args) == 2
    assert "holds a previous run (checkpoint, train_log.jsonl, bundle)" in capsys.readouterr().err
    assert (out / "bundle" / "checksums.sha256").read_text() == first
    assert cli_main([*args, "--seed", "1", "--steps", "2", "--stop-after", "1", "--overwrite"]) == 0
    assert not (out / "bundle").exists(), "the previous run's bundle is removed, not left beside the new checkpoint"
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 1
    assert cli_main([*args, "--seed", "1", "--steps", "2", "--resume"]) == 0 and (out / "bundle").is_dir()


def test_overwrite_removes_the_checkpoints_a_killed_save_left(labelled_folder, tmp_path, capsys):
    """A complete checkpoint left in ``.checkpoint.*.tmp`` by a kill is part of the previous run: a new run
    is refused over it, and ``--overwrite`` removes it, so that a later ``--resume`` cannot continue the old run."""
    out = tmp_path / "r"
    args = ["train", "--data", str(labelled_folder), "--out", str(out), "--from-scratch", *TRAIN]
    assert cli_main(args) == 0
    shutil.rmtree(out / "bundle")
    (out / "train_log.jsonl").unlink()
    leftover = out / ".checkpoint.4242.tmp"
    (out / "checkpoint").rename(leftover)
    capsys.readouterr()
    assert cli_main(args) == 2
    assert ".checkpoint.4242.tmp" in capsys.readouterr().err
    assert cli_main([*args, "--overwrite"]) == 0
    assert not leftover.exists()


def test_calibrate_refuses_an_existing_out(tiny_bundle, labelled_folder, tmp_path, capsys):
    out = tmp_path / "cal"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["calibrate", "--bundle", str(tiny_bundle), "--data", str(labelled_folder), "--out", str(out),
            "--method", "temperature", "--device", "cpu", "--pixels-per-frame", "200"]
    assert cli_main(args) == 2
    assert capsys.readouterr().err.strip() == f"uncertain-seg calibrate: error: --out {out} exists: give --overwrite to replace it, or choose another --out"
    assert (out / "notes.txt").read_text() == "mine"
    assert cli_main([*args, "--overwrite"]) == 0 and (out / "checksums.sha256").is_file() and not (out / "notes.txt").exists()


def test_evaluate_skips_the_frames_a_calibration_was_fitted_on(tiny_bundle, labelled_folder, tmp_path, capsys):
    """--skip N leaves out the folder's first N frames (name order): a report on the frames after them."""
    out = tmp_path / "report"
    args = ["evaluate", "--bundle", str(tiny_bundle), "--data", str(labelled_folder), "--device", "cpu", "--montage", "2"]
    assert cli_main([*args, "--out", str(out), "--skip", "4"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["frames"] == 2 and metrics["skipped_frames"] == 4
    assert "first 4 frames, in name order, skipped" in (out / "report.md").read_text()
    capsys.readouterr()
    assert cli_main([*args, "--out", str(tmp_path / "none"), "--skip", "6"]) == 2
    assert "--skip 6 leaves none of the 6 frames" in capsys.readouterr().err
