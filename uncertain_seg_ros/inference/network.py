"""The network as compilers and exporters see it: one input size, a batch of cameras, two outputs.

Only the segmenter's forward pass is compiled: normalised (B, 3, H, W) images in, class logits and
predicted loss at patch resolution out. Pre-processing, calibration (including the selective
scaler) and post-processing stay in PyTorch on the inference device, shared by every backend, so
all backends publish through exactly the same code.

The heads run in their inference form. Both are 1x1 convolutions over the map of patch features,
that is, linear layers over the patch tokens: the deployed network applies them as linear layers to
the token sequence and makes maps of their small outputs only. The segmentation head's BatchNorm is
folded into its weights. Every backend then sees matrix products: ONNX Runtime quantises them to
int8 (its int8 convolution is slower than float), and no transpose of the wide concatenated
features (4 x 384 channels for ViT-S) is made before the heads.

Exporters (ONNX, TensorRT) build from :func:`exportable`, a copy rewritten further for graph
compilers: LayerScale folded into the linear layer before it, and attention's query, key and value
as three linear layers, so no multiply by the scale and no split of the fused projection's output
is left in the graph (ViT-T demo, ONNX Runtime int8: 34.7 -> 32.4 ms per image).
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..model import UncertainSegmenter
from ..model.layers import Attention, Mlp, SwiGLUFFN

DEPLOYED_FORM = ("heads as linear layers over tokens, BatchNorm folded; "
                 "LayerScale folded, separate q/k/v")  # in compiled artefacts' cache keys


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A frozen linear layer holding copies of ``weight`` (out, in) and ``bias``."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer.requires_grad_(False)


def _as_linear(conv: nn.Conv2d) -> nn.Linear:
    """The linear layer over channels that a 1x1, stride-1, ungrouped convolution is."""
    if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1 or conv.padding not in ((0, 0), "valid"):
        raise ValueError(f"only a 1x1, stride-1, unpadded, ungrouped convolution is a linear layer; got {conv}")
    return _linear(conv.weight.flatten(1), conv.bias)


def _fold_batch_norm(bn: nn.BatchNorm2d, linear: nn.Linear) -> nn.Linear:
    """``linear`` applied after ``bn`` in eval mode (running statistics), as one linear layer."""
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale
        linear.bias.add_(linear.weight @ shift)
        linear.weight.mul_(scale)
    return linear


HEADS = ("seg_head", "uncertainty_head")
"""The deployed network's heads. The int8 schemes keep their linear layers float32: the segmentation
head carries the folded BatchNorm, whose per-channel scales (re-estimated at a new site by BatchNorm
adaptation) widen its weights' ranges, and the heads are a small part of the work. On the shipped
dusk demo with ONNX Runtime's int8, keeping them float raised the pixels labelled as by fp32 from
99.49% to 99.66% of 30 CamVid test frames."""


def head_linear_nodes(program: torch.export.ExportedProgram) -> set[str]:
    """Names of the graph nodes of the heads' (:data:`HEADS`) linear layers in ``program``."""
    return {node.name for node in program.graph.nodes
            if node.target == torch.ops.aten.linear.default
            and any(path.split(".")[0] in HEADS for path, _ in node.meta.get("nn_module_stack", {}).values())}


class DeployedNetwork(nn.Module):
    """``model`` fixed to an ``height`` x ``width`` input (its position-embedding table frozen), heads in inference form.

    Computes what ``model(images)`` computes. The heads' weights are copied when the network is
    built; build it again after changing the model.
    """

    def __init__(self, model: UncertainSegmenter, height: int, width: int) -> None:
        super().__init__()
        patch = model.backbone.patch_size
        if height % patch or width % patch:
            raise ValueError(f"input {height}x{width} is not a multiple of the patch size {patch}")
        self.model = model.eval()
        self.height, self.width = height, width
        self.grid = (height // patch, width // patch)
        self.model.backbone.deploy_at(height, width)
        self.seg_head = _fold_batch_norm(model.head.bn, _as_linear(model.head.conv))
        self.uncertainty_head = nn.Sequential(
            *(_as_linear(m) if isinstance(m, nn.Conv2d) else m for m in model.uncertainty_head.mlp))
        self.eval()

    def inference_modules(self) -> list[nn.Module]:
        """The modules the forward pass runs (the model's own heads and its selector are not among them)."""
        return [self.model.backbone, self.seg_head, self.uncertainty_head]

    def _to_map(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, h*w, C) per-token outputs -> contiguous (B, C, h, w), as the convolutions returned them."""
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *self.grid).contiguous()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layers = self.model.backbone.get_intermediate_layers(images, self.model.cfg.n_last_blocks, reshape=False)
        features = torch.cat(layers, dim=-1)
        return self._to_map(self.seg_head(features)), self._to_map(self.uncertainty_head(features))

    def example(self, batch: int = 1, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
        """A random input of the deployed shape, for tracing and compiling."""
        g = torch.Generator().manual_seed(0)
        return torch.randn(batch, 3, self.height, self.width, generator=g).to(device=device, dtype=dtype)


class SeparateQKVAttention(nn.Module):
    """:class:`~uncertain_seg_ros.model.layers.Attention` with its ``qkv`` projection as three linear layers."""

    def __init__(self, attn: Attention) -> None:
        super().__init__()
        self.num_heads = attn.num_heads
        dim = attn.proj.in_features
        self.q, self.k, self.v = (_rows(attn.qkv, i * dim, (i + 1) * dim) for i in range(3))
        self.proj = attn.proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = (layer(x).reshape(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)
                   for layer in (self.q, self.k, self.v))
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


def _rows(linear: nn.Linear, start: int, stop: int) -> nn.Linear:
    """The linear layer computing outputs ``start:stop`` of ``linear``."""
    return _linear(linear.weight[start:stop], None if linear.bias is None else linear.bias[start:stop])


def _scale_outputs(linear: nn.Linear, scale: torch.Tensor) -> None:
    """Multiply ``linear``'s outputs by ``scale`` (per channel) through its weights."""
    with torch.no_grad():
        linear.weight.mul_(scale[:, None])
        if linear.bias is not None:
            linear.bias.mul_(scale)


def exportable(network: DeployedNetwork) -> DeployedNetwork:
    """A copy of ``network`` for graph compilers, same function: every block's LayerScale folded into
    the linear layer it scales (``attn.proj``, the MLP's last layer) and ``qkv`` split in three."""
    net = copy.deepcopy(network)
    for block in net.model.backbone.blocks:
        ffn = block.mlp
        last = ffn.fc2 if isinstance(ffn, Mlp) else ffn.w3 if isinstance(ffn, SwiGLUFFN) else None
        if last is None or not isinstance(block.attn, Attention):
            raise ValueError(f"cannot fold LayerScale: unknown block layout {type(block.attn).__name__}/{type(ffn).__name__}")
        _scale_outputs(block.attn.proj, block.ls1.gamma)
        _scale_outputs(last, block.ls2.gamma)
        block.ls1, block.ls2 = nn.Identity(), nn.Identity()
        block.attn = SeparateQKVAttention(block.attn)
    return net.eval()


def batch_dim(max_batch: int) -> torch.export.Dim | None:
    """The dynamic batch dimension for ``max_batch`` cameras (None: a static batch of one)."""
    return torch.export.Dim("batch", min=1, max=max_batch) if max_batch > 1 else None


def export_program(network: DeployedNetwork, example: torch.Tensor, max_batch: int = 1) -> torch.export.ExportedProgram:
    """``torch.export`` of the deployed network, strict (TorchDynamo tracing: a graph break is an error)."""
    dim = batch_dim(max_batch)
    dynamic = {"images": {0: dim}} if dim is not None else None
    with torch.no_grad():
        return torch.export.export(network, (example,), dynamic_shapes=dynamic, strict=True)
