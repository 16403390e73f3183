"""Attention and GELU exported as ONNX Runtime's fused contrib operators (domain ``com.microsoft``).

Attention. The ONNX exporter writes ``scaled_dot_product_attention`` at opset 18 as MatMul, Softmax,
MatMul: ONNX Runtime then materialises every head's N x N score matrix (1565 x 1565 for ViT-S/14 at
644x476) and reads it back twice. ONNX Runtime's contrib ``MultiHeadAttention`` runs the same
product as one fused kernel, on the CPU and on CUDA. The standard opset-23 ``Attention`` operator
is no faster in ONNX Runtime 1.31's CPU kernel. Measured on this project's 2-core CPU, one ViT-S/14
attention layer (6 heads, 1565 tokens): MatMul / Softmax / MatMul 52.5 ms, opset-23 Attention
53.0 ms, MultiHeadAttention 40.7 ms, PyTorch's SDPA 41.3 ms. Query, key and value go in as (batch,
tokens, heads x head size), the operator's most widely supported layout; the output comes back as
(batch, heads, tokens, head size), as SDPA returns it.

GELU. At opset 18 exact GELU is written as Div, Erf, Add, Mul, Mul: five passes over the MLP's
widest activation (tokens x 4 x width). ONNX Runtime 1.31 does not fuse the form the exporter writes
(``x * (0.5 * (1 + erf(x / sqrt 2)))``); its contrib ``Gelu`` is one pass. Measured on ViT-S/14 at
644x476, int8: 760 -> 729 ms per image.

Only the forms the model uses are translated (attention without mask, causality, dropout or grouped
queries; exact GELU); anything else is an export error rather than a silently different graph.
"""
import onnx
import onnxscript
import torch
from onnxscript import opset18 as op

ATTENTION_OP = "com.microsoft.MultiHeadAttention"
GELU_OP = "com.microsoft.Gelu"
CONTRIB_OPS = f"{ATTENTION_OP}, {GELU_OP}"  # for cache keys: graphs with other translations are other artefacts
_FLOAT = [("T", ["tensor(float)", "tensor(float16)"], "float32 or float16 activations")]


def _contrib(name: str, signature: onnx.defs.OpSchema) -> onnxscript.values.Op:
    return onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), name, signature)


def _multi_head_attention() -> onnxscript.values.Op:
    """The contrib operator, with the part of its schema used here (onnx does not ship ONNX Runtime's schemas)."""
    schema = onnx.defs.OpSchema
    signature = schema(
        "MultiHeadAttention", "com.microsoft", 1,
        inputs=[schema.FormalParameter(name, "T") for name in ("query", "key", "value")],
        outputs=[schema.FormalParameter("output", "T")],
        type_constraints=_FLOAT,
        attributes=[schema.Attribute("num_heads", schema.AttrType.INT, "number of attention heads"),
                    schema.Attribute("scale", schema.AttrType.FLOAT, "scale of Q K^T (default 1/sqrt(head size))",
                                     required=False)])
    return _contrib("MultiHeadAttention", signature)


def _gelu() -> onnxscript.values.Op:
    """The contrib exact (erf) GELU, one input, one output."""
    schema = onnx.defs.OpSchema
    return _contrib("Gelu", schema("Gelu", "com.microsoft", 1, inputs=[schema.FormalParameter("X", "T")],
                                   outputs=[schema.FormalParameter("Y", "T")], type_constraints=_FLOAT))


MULTI_HEAD_ATTENTION = _multi_head_attention()
GELU = _gelu()


def _heads_to_tokens(x):
    """(B, heads, N, D) -> (B, N, heads x D)."""
    return op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))


def fused_sdpa(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
               scale: float | None = None, enable_gqa: bool = False):
    """ONNX translation of ``aten.scaled_dot_product_attention`` for (B, heads, N, D) inputs."""
    if attn_mask is not None or dropout_p or is_causal or enable_gqa:
        raise NotImplementedError(
            "the fused ONNX attention translates unmasked, non-causal attention without dropout or grouped "
            f"queries; got attn_mask={attn_mask is not None}, dropout_p={dropout_p}, is_causal={is_causal}, "
            f"enable_gqa={enable_gqa}")
    heads = query.shape[1]
    if not isinstance(heads, int):
        raise NotImplementedError(f"the number of attention heads must be static, got {heads}")
    attributes = {"num_heads": heads} if scale is None else {"num_heads": heads, "scale": float(scale)}
    out = MULTI_HEAD_ATTENTION(_heads_to_tokens(query), _heads_to_tokens(key), _heads_to_tokens(value), **attributes)
    return op.Transpose(op.Reshape(out, op.Constant(value_ints=[0, 0, heads, -1])), perm=[0, 2, 1, 3])


def fused_gelu(x, approximate: str = "none"):
    """ONNX translation of ``aten.gelu`` (exact form only)."""
    if approximate != "none":
        raise NotImplementedError(f"the fused ONNX GELU translates the exact (erf) form; got approximate={approximate!r}")
    return GELU(x)


def contrib_translation() -> dict:
    """The exporter's ``custom_translation_table`` entries that write attention and GELU as fused operators."""
    return {torch.ops.aten.scaled_dot_product_attention.default: fused_sdpa, torch.ops.aten.gelu.default: fused_gelu}
