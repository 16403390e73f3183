"""The network as compilers and exporters see it: one input size, a batch of cameras, two outputs.

Only the segmenter's forward pass is compiled: normalised (B, 3, H, W) images in, class logits and
predicted loss at patch resolution out. Pre-processing, calibration (including the selective
scaler) and post-processing stay in PyTorch on the inference device, shared by every backend, so
all backends publish through exactly the same code.
"""
import torch
from torch import nn

from ..model import UncertainSegmenter


class DeployedNetwork(nn.Module):
    """``model`` fixed to an ``height`` x ``width`` input (its position-embedding table frozen)."""

    def __init__(self, model: UncertainSegmenter, height: int, width: int) -> None:
        super().__init__()
        patch = model.backbone.patch_size
        if height % patch or width % patch:
            raise ValueError(f"input {height}x{width} is not a multiple of the patch size {patch}")
        self.model = model.eval()
        self.height, self.width = height, width
        self.model.backbone.deploy_at(height, width)
        self.eval()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, predicted_loss = self.model(images)
        return logits, predicted_loss

    def example(self, batch: int = 1, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
        """A random input of the deployed shape, for tracing and compiling."""
        g = torch.Generator().manual_seed(0)
        return torch.randn(batch, 3, self.height, self.width, generator=g).to(device=device, dtype=dtype)


def batch_dim(max_batch: int) -> torch.export.Dim | None:
    """The dynamic batch dimension for ``max_batch`` cameras (None: a static batch of one)."""
    return torch.export.Dim("batch", min=1, max=max_batch) if max_batch > 1 else None


def export_program(network: DeployedNetwork, example: torch.Tensor, max_batch: int = 1) -> torch.export.ExportedProgram:
    """``torch.export`` of the deployed network, strict (TorchDynamo tracing: a graph break is an error)."""
    dim = batch_dim(max_batch)
    dynamic = {"images": {0: dim}} if dim is not None else None
    with torch.no_grad():
        return torch.export.export(network, (example,), dynamic_shapes=dynamic, strict=True)
