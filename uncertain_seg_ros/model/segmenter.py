"""The deployed network: DINOv2 backbone + linear segmentation head + loss-prediction uncertainty head."""
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..calibration import SelectiveScaler
from .heads import LinearSegHead, UncertaintyHead
from .vision_transformer import BackboneConfig, DinoVisionTransformer


@dataclass(frozen=True)
class SegmenterConfig:
    """Architecture of the whole network; stored in every model bundle."""

    num_classes: int
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    n_last_blocks: int = 4
    uncertainty_hidden: int = 512
    selector_hidden: int = 0

    def to_dict(self) -> dict:
        return {
            "num_classes": self.num_classes,
            "backbone": self.backbone.to_dict(),
            "n_last_blocks": self.n_last_blocks,
            "uncertainty_hidden": self.uncertainty_hidden,
            "selector_hidden": self.selector_hidden,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "SegmenterConfig":
        d = dict(d)
        backbone = BackboneConfig.from_dict(d.pop("backbone"))
        unknown = set(d) - {"num_classes", "n_last_blocks", "uncertainty_hidden", "selector_hidden"}
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        d.setdefault("selector_hidden", 0)  # absent in bundles made before selective scaling
        return cls(backbone=backbone, **d)


class UncertainSegmenter(nn.Module):
    """Images -> (class logits, predicted per-pixel loss), both at patch-grid resolution.

    Upsampling to the label or camera resolution is left to the caller, so it is done once, at the
    size that is needed, and on logits rather than on probabilities.

    With ``cfg.selector_hidden > 0`` the model also carries ``selector``, the misprediction selector
    of selective scaling (see :mod:`uncertain_seg_ros.calibration`), so that its weights travel in
    the bundle's ``model.safetensors``; otherwise ``selector`` is None. It is not part of
    :meth:`forward`: ``decode`` applies it (``prediction.selector_flags``). It is fitted by
    ``uncertain-seg calibrate``, not by the training losses, so its parameters are frozen
    (``requires_grad=False``), which keeps optimisers and DistributedDataParallel away from them.
    """

    def __init__(self, cfg: SegmenterConfig) -> None:
        super().__init__()
        if not 1 <= cfg.n_last_blocks <= cfg.backbone.depth:
            raise ValueError(f"n_last_blocks must be in [1, {cfg.backbone.depth}], got {cfg.n_last_blocks}")
        if cfg.selector_hidden < 0:
            raise ValueError(f"selector_hidden must be >= 0 (0: no selector), got {cfg.selector_hidden}")
        self.cfg = cfg
        self.backbone = DinoVisionTransformer(cfg.backbone)
        channels = cfg.backbone.embed_dim * cfg.n_last_blocks
        self.head = LinearSegHead(channels, cfg.num_classes)
        self.uncertainty_head = UncertaintyHead(channels, cfg.uncertainty_hidden)
        self.selector = SelectiveScaler(cfg.num_classes, cfg.selector_hidden).requires_grad_(False) if cfg.selector_hidden else None

    def set_selector(self, selector: SelectiveScaler | None) -> None:
        """Attach a fitted selector (frozen), or remove it with None; ``cfg.selector_hidden`` follows."""
        if selector is not None and selector.num_classes != self.cfg.num_classes:
            raise ValueError(f"selector takes {selector.num_classes} classes, the model predicts {self.cfg.num_classes}")
        self.selector = None if selector is None else selector.requires_grad_(False)
        self.cfg = replace(self.cfg, selector_hidden=0 if selector is None else selector.hidden)

    def forward(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``images`` (B, 3, H, W) normalised, sides multiples of 14; ``masks`` optional (B, H/14*W/14) bool.

        Returns logits (B, K, H/14, W/14) and predicted loss (B, 1, H/14, W/14); the uncertainty head
        sees stop-gradient features.
        """
        features = self.features(images, masks)
        return self.head(features), self.uncertainty_head(features.detach())

    def features(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """What both heads see: the last ``n_last_blocks`` blocks' normalised patch tokens,
        concatenated, (B, n_last_blocks * D, H/14, W/14)."""
        return torch.cat(self.backbone.get_intermediate_layers(images, self.cfg.n_last_blocks, masks), dim=1)
