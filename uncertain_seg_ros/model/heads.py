"""Heads on DINOv2 patch features: a linear segmentation head and a loss-prediction uncertainty head."""
import torch
from torch import nn


class LinearSegHead(nn.Module):
    """BatchNorm + 1x1 convolution on the concatenated patch tokens of the last blocks (DINOv2's linear head)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(features))


class UncertaintyHead(nn.Module):
    """Per-patch predicted loss: MLP D -> hidden -> hidden -> 1 (LeakyReLU, Softplus), as 1x1 convs.

    Pretrained Visual Uncertainties (Kirchhof et al. 2024). The caller feeds it detached features so
    that training it never changes the backbone or the segmentation.
    """

    def __init__(self, in_channels: int, hidden: int = 512) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1),
            nn.LeakyReLU(),
            nn.Conv2d(hidden, hidden, 1),
            nn.LeakyReLU(),
            nn.Conv2d(hidden, 1, 1),
            nn.Softplus(),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features)
