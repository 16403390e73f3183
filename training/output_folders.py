"""Where a command writes its result: never over a previous result unless the user says so (``--overwrite``).

``bag write`` always refused an existing ``--out``; ``train``/``adapt`` without ``--resume`` and
``calibrate`` silently replaced theirs. A training run's folder is reused only to continue it
(``--resume``); ``--overwrite`` starts a new run there after removing the previous run's artefacts,
so that a later ``--resume`` can never pick up the old run's checkpoint or cached target frames;
that includes the complete checkpoints a killed save leaves beside ``checkpoint/``, from which
``--resume`` would otherwise continue the old run.
"""
import os
import shutil
from pathlib import Path

from uncertain_seg_ros.atomic_io import leftovers

RUN_ARTEFACTS = ("checkpoint", "train_log.jsonl", "bundle", "target_frames")


def prepare_run_folder(out: str | os.PathLike, resume: bool, overwrite: bool) -> None:
    """Refuse a new run over a previous one in ``out`` unless ``overwrite``; with it, remove the previous artefacts.

    Under torchrun only rank 0 removes anything; every rank checks before any rank writes (the
    process group is set up after this), so they all decide alike.
    """
    out = Path(out)
    if resume:
        return
    found = [out / name for name in RUN_ARTEFACTS if (out / name).exists()]
    found += [p for name in RUN_ARTEFACTS for p in leftovers(out / name)]
    if not found:
        return
    if not overwrite:
        raise FileExistsError(f"--out {out} holds a previous run ({', '.join(p.name for p in found)}): continue it with "
                              "--resume, start a new one there with --overwrite, or choose another --out")
    if os.environ.get("RANK", "0") == "0":
        for path in found:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


def refuse_existing(out: str | os.PathLike, overwrite: bool) -> None:
    """Refuse to write over an existing, non-empty ``out`` unless ``overwrite`` (the writer then replaces it whole)."""
    out = Path(out)
    if overwrite or not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    raise FileExistsError(f"--out {out} exists: give --overwrite to replace it, or choose another --out")
