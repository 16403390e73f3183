"""Calibration of class probabilities: temperature scaling (a single T applied to all logits)."""
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Calibration:
    """How logits become calibrated probabilities; stored in the model bundle."""

    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated logits (B, K, H, W)."""
        return logits if self.temperature == 1.0 else logits / self.temperature

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(**d)
