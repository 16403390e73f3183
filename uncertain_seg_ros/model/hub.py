"""Official DINOv2 hub names -> backbone configs, and loading of the official pretrained weights."""
import logging
import os
from dataclasses import replace
from pathlib import Path

import torch

from .vision_transformer import BackboneConfig, DinoVisionTransformer

log = logging.getLogger(__name__)

DINOV2_BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"

_ARCHS = {
    "vits14": dict(embed_dim=384, depth=12, num_heads=6),
    "vitb14": dict(embed_dim=768, depth=12, num_heads=12),
    "vitl14": dict(embed_dim=1024, depth=24, num_heads=16),
    "vitg14": dict(embed_dim=1536, depth=40, num_heads=24, ffn_layer="swiglu"),
}
_REGISTERS = dict(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0)

BACKBONES: dict[str, BackboneConfig] = {}
for _arch, _kw in _ARCHS.items():
    BACKBONES[f"dinov2_{_arch}"] = BackboneConfig(**_kw)
    BACKBONES[f"dinov2_{_arch}_reg"] = BackboneConfig(**_kw, **_REGISTERS)

# Not an official model: a small DINOv2-architecture backbone for the demo bundle, trained from
# scratch where the official weights cannot be had. LayerScale starts at 0.1 for faster training.
BACKBONES["demo_vitt14"] = BackboneConfig(embed_dim=192, depth=6, num_heads=3, init_values=0.1)


class PretrainedWeightsError(RuntimeError):
    """Official weights were asked for but could not be found or downloaded."""


def backbone_config(name: str, **overrides) -> BackboneConfig:
    """The config of a hub name (``dinov2_vits14``, ``dinov2_vitb14_reg``, ...), with optional overrides."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return replace(BACKBONES[name], **overrides)


def pretrained_url(name: str) -> str:
    """Official download URL of a hub name's pretrained backbone weights."""
    if not name.startswith("dinov2_") or name not in BACKBONES:
        raise ValueError(f"{name!r} has no official pretrained weights")
    base = name.removesuffix("_reg")
    full = f"{base}_reg4" if name.endswith("_reg") else base
    return f"{DINOV2_BASE_URL}/{base}/{full}_pretrain.pth"


def load_official_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an official ``.pth`` (tensors only, no pickle code) or a ``.safetensors`` state dict."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsError(f"pretrained weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise PretrainedWeightsError(f"{path} does not hold a state dict")
    return state


def dinov2_backbone(
    name: str = "dinov2_vits14",
    weights: str | os.PathLike | None = None,
    download: bool = False,
    url: str | None = None,
    **overrides,
) -> DinoVisionTransformer:
    """Build a DINOv2 backbone by its official hub name and optionally load pretrained weights.

    ``weights`` is a local ``.pth``/``.safetensors`` file; with ``download=True`` and no file, the
    official checkpoint is fetched from ``url`` (default: the official URL) and cached by torch.hub.
    Weights always load with strict=True.
    """
    model = DinoVisionTransformer(backbone_config(name, **overrides))
    if weights is not None:
        state = load_official_state_dict(weights)
    elif download:
        url = url or pretrained_url(name)
        try:
            state = torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)
        except Exception as exc:  # urllib raises several types when offline
            raise PretrainedWeightsError(
                f"could not download {name} weights from {url} ({exc}). When offline, download the file "
                "elsewhere and pass it with --pretrained PATH"
            ) from exc
    else:
        return model
    model.load_state_dict(state, strict=True)
    log.info("loaded pretrained %s weights (%d tensors)", name, len(state))
    return model
