"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a folder written atomically: ``model.safetensors`` (the model),
``optimizer.safetensors`` (AdamW moments + the torch RNG state) and ``state.json`` (step, config,
optimizer hyper-parameters). Resuming restores all of it, so a resumed run continues exactly.
"""
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from uncertain_seg_ros.atomic_io import atomic_directory

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
EXTRA_FILE = "extra.safetensors"
STATE_FILE = "state.json"


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


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore a checkpoint folder into ``model`` and ``optimizer``; returns ``state.json``.

    Extra tensors saved with the checkpoint come back under the key ``"extra_tensors"``.
    """
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (expected {STATE_FILE})")
    state = json.loads((path / STATE_FILE).read_text())
    model.load_state_dict(load_file(str(path / MODEL_FILE)), strict=True)
    tensors = load_file(str(path / OPTIMIZER_FILE))
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, idx, name = key.split(".", 2)
            slots.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": slots, "param_groups": state["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    state["extra_tensors"] = load_file(str(path / EXTRA_FILE)) if (path / EXTRA_FILE).is_file() else {}
    return state
