"""Checkpoints that survive a kill at the worst moment: between the atomic save's two renames.

The kill is real (SIGKILL from inside the training process, timed by a Python audit hook on the
rename that would put the new checkpoint in place); the run is then resumed with --resume."""
import json
import os
import signal
import subprocess
import sys

import torch
from safetensors.torch import load_file

from uncertain_seg_ros.atomic_io import leftovers
from uncertain_seg_training.checkpoint import STATE_FILE, complete_step
from uncertain_seg_training.cli import main as cli_main

from conftest import REPO
from test_training import TINY, _env

KILL_AT_RENAME = """
import os, signal, sys
target, nth = os.path.realpath(sys.argv[1]), int(sys.argv[2])
renames = []

def hook(event, args):
    if event == "os.rename" and os.path.realpath(os.fsdecode(args[1])) == target:
        renames.append(args)
        if len(renames) == nth:
            os.kill(os.getpid(), signal.SIGKILL)

sys.addaudithook(hook)
from uncertain_seg_training.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _train(args: list[str], checkpoint, kill_at_rename: int) -> subprocess.CompletedProcess:
    """``uncertain-seg`` in a child process, SIGKILLed at its ``kill_at_rename``-th rename onto ``checkpoint``."""
    return subprocess.run([sys.executable, "-c", KILL_AT_RENAME, str(checkpoint), str(kill_at_rename), *args],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)


def test_resume_after_a_kill_between_the_two_renames(labelled_folder, tmp_path):
    """Killed as the step-4 checkpoint was about to replace the step-2 one: no checkpoint/, the step-2
    one in .checkpoint.old-*, the complete step-4 one in .checkpoint.*.tmp. --resume continues from
    step 4 (an incomplete leftover claiming step 6 is ignored), ends bit-identical to an uninterrupted
    run, and no leftover folder remains."""
    args = ["train", "--data", str(labelled_folder), "--steps", "6", "--checkpoint-every", "2", *TINY]
    full = _train([*args, "--out", str(tmp_path / "full")], tmp_path / "full" / "checkpoint", 0)
    assert full.returncode == 0, full.stderr[-2000:]
    part = tmp_path / "part"
    ckpt = part / "checkpoint"
    killed = _train([*args, "--out", str(part)], ckpt, 2)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not ckpt.exists()
    left = {folder.name.rsplit(".", 1)[-1].split("-")[0]: complete_step(folder) for folder in leftovers(ckpt)}
    assert left == {"tmp": 4, "old": 2}, left

    broken = part / ".checkpoint.zzzz.tmp"
    broken.mkdir()
    (broken / STATE_FILE).write_text(json.dumps({"step": 6, "param_groups": []}))
    (broken / "model.safetensors").write_bytes((next(iter(leftovers(ckpt))) / "model.safetensors").read_bytes()[:5000])
    assert complete_step(broken) is None

    resumed = _train([*args, "--out", str(part), "--resume"], ckpt, 0)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from the complete checkpoint it left in" in resumed.stderr
    a = load_file(str(tmp_path / "full" / "bundle" / "model.safetensors"))
    b = load_file(str(part / "bundle" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(x)["step"] for x in (part / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    assert complete_step(ckpt) == 6 and leftovers(ckpt) == []
    assert sorted(p.name for p in part.iterdir() if p.name.startswith(".")) == []


def test_resume_at_the_last_step_tidies_the_folder(labelled_folder, tmp_path):
    """Killed at the final checkpoint's second rename: --resume has no step left to run, exports the
    bundle from the leftover step-4 checkpoint, and puts it in place of the missing checkpoint/."""
    args = ["train", "--data", str(labelled_folder), "--steps", "4", "--checkpoint-every", "2", *TINY]
    part = tmp_path / "part"
    killed = _train([*args, "--out", str(part)], part / "checkpoint", 2)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert cli_main([*args, "--out", str(part), "--resume"]) == 0
    assert complete_step(part / "checkpoint") == 4 and leftovers(part / "checkpoint") == []
    assert (part / "bundle" / "model.safetensors").is_file()
    assert os.listdir(part) and not [p for p in os.listdir(part) if p.startswith(".")]
