"""DINOv2 vision transformer with the official parameter names, so official checkpoints load strictly.

Reads top to bottom like the official ``dinov2/models/vision_transformer.py``: patch embedding,
optional mask-token substitution, class token, interpolated position embeddings, optional register
tokens, a stack of pre-norm blocks and a final LayerNorm.
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Block, PatchEmbed


@dataclass(frozen=True)
class BackboneConfig:
    """Everything that fixes a DINOv2 backbone's parameters and numerics."""

    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    ffn_layer: str = "mlp"
    patch_size: int = 14
    img_size: int = 518
    num_register_tokens: int = 0
    init_values: float = 1.0
    interpolate_antialias: bool = False
    interpolate_offset: float = 0.1
    drop_path_rate: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BackboneConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown backbone config keys: {sorted(unknown)}")
        return cls(**d)


class DinoVisionTransformer(nn.Module):
    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        if cfg.ffn_layer not in ("mlp", "swiglu"):
            raise ValueError(f"ffn_layer must be 'mlp' or 'swiglu', got {cfg.ffn_layer!r}")
        self.cfg = cfg
        self.patch_size = cfg.patch_size
        self.embed_dim = cfg.embed_dim
        self.num_register_tokens = cfg.num_register_tokens
        grid = cfg.img_size // cfg.patch_size

        self.patch_embed = PatchEmbed(cfg.patch_size, 3, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, cfg.embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, cfg.num_register_tokens, cfg.embed_dim)) if cfg.num_register_tokens else None
        )
        # on the CPU explicitly, so that the model can also be built under a torch.device("meta") context
        drop_path = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.ffn_layer, cfg.init_values, dp) for dp in drop_path
        )
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, cfg.embed_dim))
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        self.deployed_size: tuple[int, int] | None = None
        self.register_buffer("deployed_pos_embed", None, persistent=False)
        self.init_weights()

    def init_weights(self) -> None:
        """Initialisation of the official code (timm ViT scheme), for training from scratch."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, h: int, w: int) -> torch.Tensor:
        """Position embeddings for an ``h`` x ``w`` pixel input, as the official model computes them.

        Bicubic resampling of the pretrained square grid, with the official scale-factor + offset
        convention. Outside training the table is cached per input size: it is constant for a
        deployed resolution.
        """
        if self.deployed_size == (h, w):
            return self.deployed_pos_embed
        cacheable = not (self.training or torch.is_grad_enabled() or torch.compiler.is_compiling())
        key = (h, w, self.pos_embed.data_ptr(), self.pos_embed._version, self.pos_embed.device, self.pos_embed.dtype) if cacheable else None
        if cacheable and key in self._pos_cache:
            return self._pos_cache[key]
        N = self.pos_embed.shape[1] - 1
        h0, w0 = h // self.patch_size, w // self.patch_size
        if h0 * w0 == N and h0 == w0:
            return self.pos_embed
        pos_embed = self.pos_embed.float()
        M = int(math.sqrt(N))
        dim = pos_embed.shape[-1]
        if self.cfg.interpolate_offset:
            scale = ((h0 + self.cfg.interpolate_offset) / M, (w0 + self.cfg.interpolate_offset) / M)
            kwargs = {"scale_factor": scale}
        else:
            kwargs = {"size": (h0, w0)}
        patch_pos = F.interpolate(
            pos_embed[:, 1:].reshape(1, M, M, dim).permute(0, 3, 1, 2),
            mode="bicubic",
            antialias=self.cfg.interpolate_antialias,
            **kwargs,
        )
        if patch_pos.shape[-2:] != (h0, w0):
            raise RuntimeError(f"position embedding interpolated to {tuple(patch_pos.shape[-2:])}, expected {(h0, w0)}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h0 * w0, dim)
        table = torch.cat((pos_embed[:, :1], patch_pos), dim=1).to(self.pos_embed.dtype)
        if cacheable:
            self._pos_cache = {key: table}
        return table

    @torch.no_grad()
    def deploy_at(self, h: int, w: int) -> None:
        """Fix the position-embedding table for an ``h`` x ``w`` input as a (non-persistent) buffer.

        Compilers and exporters (torch.compile, torch.export, ONNX, TensorRT) then see a constant
        instead of the interpolation and its per-size cache; other sizes still interpolate. Call it
        again after changing ``pos_embed``.
        """
        self.deployed_size = None
        self.deployed_pos_embed = self.interpolate_pos_encoding(h, w).detach().clone()
        self.deployed_size = (h, w)

    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) -> tokens [cls, registers..., patches...] with position embeddings.

        ``masks`` (B, H/14 * W/14) bool: masked patches are replaced by ``mask_token`` before the
        position embeddings are added (the DINOv2 / Masked gamma-SSL convention).
        """
        H, W = x.shape[-2:]
        tokens = self.patch_embed(x)
        if masks is not None:
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype).unsqueeze(0), tokens)
        tokens = torch.cat((self.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
        tokens = tokens + self.interpolate_pos_encoding(H, W).to(tokens.dtype)
        if self.register_tokens is not None:
            reg = self.register_tokens.expand(tokens.shape[0], -1, -1)
            tokens = torch.cat((tokens[:, :1], reg, tokens[:, 1:]), dim=1)
        return tokens

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Normalised class, register and patch tokens of the last block (official output keys)."""
        tokens = self.prepare_tokens(x, masks)
        for blk in self.blocks:
            tokens = blk(tokens)
        tokens = self.norm(tokens)
        r = 1 + self.num_register_tokens
        return {
            "x_norm_clstoken": tokens[:, 0],
            "x_norm_regtokens": tokens[:, 1:r],
            "x_norm_patchtokens": tokens[:, r:],
        }

    def get_intermediate_layers(
        self, x: torch.Tensor, n: int = 1, masks: torch.Tensor | None = None, reshape: bool = True
    ) -> list[torch.Tensor]:
        """Normalised patch tokens of the last ``n`` blocks, each as a (B, D, H/14, W/14) map, or with
        ``reshape=False`` as the (B, H/14 * W/14, D) token sequence, row-major over the patch grid."""
        B, _, H, W = x.shape
        h, w = H // self.patch_size, W // self.patch_size
        tokens = self.prepare_tokens(x, masks)
        first = len(self.blocks) - n
        outputs = []
        for i, blk in enumerate(self.blocks):
            tokens = blk(tokens)
            if i >= first:
                patches = self.norm(tokens)[:, 1 + self.num_register_tokens :]
                outputs.append(patches.transpose(1, 2).reshape(B, -1, h, w) if reshape else patches)
        return outputs

    def forward(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """The class token, as the official model returns with its identity head."""
        return self.forward_features(x, masks)["x_norm_clstoken"]
