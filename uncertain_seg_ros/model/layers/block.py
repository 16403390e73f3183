"""Pre-norm transformer block with layer scale and stochastic depth, DINOv2 parameter names."""
import torch
from torch import nn

from .attention import Attention
from .layer_scale import LayerScale
from .mlp import Mlp
from .swiglu_ffn import SwiGLUFFN


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        ffn_layer: str = "mlp",
        init_values: float = 1e-5,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        ffn = {"mlp": Mlp, "swiglu": SwiGLUFFN}[ffn_layer]
        self.mlp = ffn(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values)
        self.drop_path = drop_path

    def _residual(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        """Add ``branch`` to ``x``, dropping it per sample with probability ``drop_path`` in training."""
        if not self.training or self.drop_path == 0.0:
            return x + branch
        keep = torch.rand(x.shape[0], 1, 1, device=x.device) >= self.drop_path
        return x + branch * keep.to(branch.dtype) / (1.0 - self.drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._residual(x, self.ls1(self.attn(self.norm1(x))))
        return self._residual(x, self.ls2(self.mlp(self.norm2(x))))
