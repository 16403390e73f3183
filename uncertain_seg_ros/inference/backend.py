"""The interface every inference backend implements, and the precisions they run.

A backend turns a normalised (B, 3, H, W) float32 batch on the inference device into the
network's (logits, predicted loss) at patch resolution, on the same device. Which engine computes
them (PyTorch eager, torch.compile with CUDA graphs, ONNX Runtime, TensorRT, OpenVINO) is its business.
Choosing and building one is :mod:`.factory`'s; this module imports no backend.
"""
from abc import ABC, abstractmethod

import torch

from .network import DeployedNetwork

# Precision -> the float type of the network's inputs and outputs. int8 (ONNX Runtime or OpenVINO on
# the CPU) stores the linear layers' weights as int8 inside the graph; its inputs and outputs stay float32.
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.float32}


class BackendUnavailable(RuntimeError):
    """The backend cannot run here; the message says why and what to install."""


class Backend(ABC):
    """The network behind one engine, fixed to one input size and precision on one device."""

    name: str = ""

    def __init__(self, network: DeployedNetwork, device: torch.device, precision: str, max_batch: int) -> None:
        self.network, self.device, self.precision, self.max_batch = network, device, precision, max_batch
        self.dtype = PRECISIONS[precision]

    @abstractmethod
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) float32 on the device -> (logits, predicted loss), float, on the device."""

    def describe(self) -> str:
        return f"{self.name} {self.precision} on {self.device}"
