"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a folder written atomically: ``model.safetensors`` (the model),
``optimizer.safetensors`` (AdamW moments + the torch RNG state) and ``state.json`` (step, config,
optimizer hyper-parameters). Resuming restores all of it, so a resumed run continues exactly.

A run killed while saving leaves folders beside ``checkpoint/`` (see
:func:`uncertain_seg_ros.atomic_io.leftovers`); killed between the save's two renames it leaves no
``checkpoint/`` at all, but a complete new checkpoint in ``.checkpoint.*.tmp`` and the previous one
in ``.checkpoint.old-*``. :func:`load_checkpoint` resumes from the newest complete one of them;
:func:`settle_checkpoint` and every successful save remove the rest.
"""
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from uncertain_seg_ros.atomic_io import atomic_directory, leftovers

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
EXTRA_FILE = "extra.safetensors"
STATE_FILE = "state.json"
LOADED_FROM = "checkpoint_folder"
"""Key of the state :func:`load_checkpoint` returns: the folder it was read from."""

log = logging.getLogger(__name__)


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    extra: dict,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write model, optimizer and RNG state at ``step`` to the folder ``path`` (replaced atomically).

    ``extra_tensors`` holds further state a stage needs to resume exactly (e.g. an EMA teacher).
    Once the new checkpoint is in place, folders that killed saves left beside it are removed.
    """
    opt = optimizer.state_dict()
    tensors = {"rng.torch": torch.get_rng_state()}
    for idx, slots in opt["state"].items():
        for name, value in slots.items():
            tensors[f"state.{idx}.{name}"] = value.detach().cpu().contiguous()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    model_state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    state = {"step": step, "param_groups": opt["param_groups"], **extra}
    with atomic_directory(path) as tmp:
        save_file(model_state, str(tmp / MODEL_FILE))
        save_file(tensors, str(tmp / OPTIMIZER_FILE))
        if extra_tensors:
            save_file({k: v.detach().cpu().contiguous() for k, v in extra_tensors.items()}, str(tmp / EXTRA_FILE))
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))
    _remove_leftovers(path)


def complete_step(folder: Path) -> int | None:
    """The step of a complete checkpoint folder, else None.

    Complete: ``state.json`` (written last) parses with an integer step, and the tensor files it
    needs are whole safetensors files (their headers' offsets fit the file sizes).
    """
    try:
        state = json.loads((folder / STATE_FILE).read_text())
        for name in (MODEL_FILE, OPTIMIZER_FILE, *([EXTRA_FILE] if (folder / EXTRA_FILE).exists() else [])):
            with safe_open(str(folder / name), "pt"):
                pass
    except (OSError, ValueError, SafetensorError):
        return None
    step = state.get("step") if isinstance(state, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def newest_checkpoint(path: Path) -> Path | None:
    """The complete checkpoint with the highest step among ``path`` and its leftovers (``path`` wins a tie)."""
    found = [(step, folder == path, folder) for folder in (path, *leftovers(path))
             if (step := complete_step(folder)) is not None]
    return max(found, key=lambda f: f[:2])[2] if found else None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore the newest complete checkpoint at ``path`` or beside it into ``model`` and ``optimizer``;
    returns its ``state.json``, with the folder it was read from under :data:`LOADED_FROM`.

    Extra tensors saved with the checkpoint come back under the key ``"extra_tensors"``. Reads only:
    with several processes each one loads, then the main one calls :func:`settle_checkpoint`.
    """
    path = Path(path)
    folder = newest_checkpoint(path)
    if folder is None:
        considered = ", ".join(str(p) for p in (path, *leftovers(path)))
        raise FileNotFoundError(f"no complete checkpoint at {path} (looked at {considered}; expected {STATE_FILE})")
    if folder != path:
        log.warning("%s is missing or older: a save was killed; resuming from the complete checkpoint it left in %s",
                    path, folder)
    state = json.loads((folder / STATE_FILE).read_text())
    model.load_state_dict(load_file(str(folder / MODEL_FILE)), strict=True)
    tensors = load_file(str(folder / OPTIMIZER_FILE))
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, idx, name = key.split(".", 2)
            slots.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": slots, "param_groups": state["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    state["extra_tensors"] = load_file(str(folder / EXTRA_FILE)) if (folder / EXTRA_FILE).is_file() else {}
    state[LOADED_FROM] = str(folder)
    return state


def settle_checkpoint(path: Path, loaded_from: Path) -> None:
    """After a resume: put the checkpoint that was loaded at ``path`` and remove the other leftovers."""
    path, loaded_from = Path(path), Path(loaded_from)
    if loaded_from != path:
        if path.exists():
            shutil.rmtree(path)
        os.replace(loaded_from, path)
    _remove_leftovers(path)


def _remove_leftovers(path: Path) -> None:
    for folder in leftovers(path):
        shutil.rmtree(folder, ignore_errors=True)
        log.info("removed %s, left by a killed checkpoint save", folder)
