"""Transformer feed-forward block (``fc1`` -> GELU -> ``fc2``)."""
import torch
from torch import nn


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
