"""The DINOv2 segmenter with uncertainty: backbone, heads and the hub of official configs."""
from .hub import BACKBONES, PretrainedWeightsError, backbone_config, dinov2_backbone, pretrained_url
from .segmenter import SegmenterConfig, UncertainSegmenter
from .vision_transformer import BackboneConfig, DinoVisionTransformer

__all__ = [
    "BACKBONES",
    "BackboneConfig",
    "DinoVisionTransformer",
    "PretrainedWeightsError",
    "SegmenterConfig",
    "UncertainSegmenter",
    "backbone_config",
    "dinov2_backbone",
    "pretrained_url",
]
