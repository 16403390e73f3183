"""int8 for ONNX Runtime on the CPU: weights quantised once, activations quantised per call.

Dynamic quantisation (``onnxruntime.quantization.quantize_dynamic``) stores the weights of the
backbone's linear layers (Gemm, and MatMul with a constant right-hand side) as int8, one scale per
output channel, and quantises their inputs to uint8 at run time, so no calibration data is needed
and a model bundle can be converted on the robot. Attention's activation-by-activation products,
convolutions, normalisation and the heads (:data:`~.network.HEADS`, found by the exporter's
module-scope metadata) stay float32.

ONNX Runtime multiplies uint8 by int8 with AVX512-VNNI / AVX-VNNI dot products where the CPU has
them. Without VNNI, x86 CPUs use an instruction that saturates 16-bit sums; ONNX Runtime's advice
is then to quantise weights to 7 bits (``reduce_range``), which this module does, so the quantised
graph depends on the CPU and the CPU's VNNI support belongs in the artefact cache key.
"""
import ast
import functools
import logging
import platform
from pathlib import Path

from .network import HEADS

QUANTISED_OPS = ("Gemm", "MatMul")


@functools.cache
def cpu_has_vnni() -> bool:
    """Whether the CPU multiplies uint8 x int8 without 16-bit saturation (x86 VNNI; every ARM64 CPU)."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return True
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_vnni", "avx_vnni"})
    except OSError:
        pass
    return False


def quantisation_options() -> dict[str, str]:
    """What the int8 graph depends on besides the model and library versions (for the cache key)."""
    return {"weights": "int8 per channel", "activations": "uint8 dynamic", "ops": "+".join(QUANTISED_OPS),
            "float": "+".join(HEADS), "reduce_range": str(not cpu_has_vnni()).lower()}


def head_nodes(model) -> list[str]:
    """Names of the nodes of ``model`` (an ``onnx.ModelProto`` from ``torch.onnx.export(dynamo=True)``)
    inside the network's heads, read from the exporter's ``pkg.torch.onnx.name_scopes`` metadata."""
    names = []
    for node in model.graph.node:
        scopes = {p.key: p.value for p in node.metadata_props}.get("pkg.torch.onnx.name_scopes")
        if scopes is not None and any(scope.split(".")[0] in HEADS for scope in ast.literal_eval(scopes)):
            names.append(node.name)
    return names


def quantise_dynamic_int8(src: str | Path, dst: str | Path) -> Path:
    """Write the int8 version of the float32 ONNX graph ``src`` to ``dst`` (see the module's docstring)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    keep_float = head_nodes(onnx.load(str(src), load_external_data=False))
    if not keep_float:
        raise ValueError(f"{src}: no node carries the exporter's scope of the heads {HEADS}; cannot keep them float32")
    root = logging.getLogger()  # the quantiser logs every layer it passes over to the root logger
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         reduce_range=not cpu_has_vnni(), op_types_to_quantize=list(QUANTISED_OPS),
                         nodes_to_exclude=keep_float, extra_options={"MatMulConstBOnly": True})
    finally:
        root.setLevel(level)
    return Path(dst)
