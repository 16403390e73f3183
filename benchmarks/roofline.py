"""The floor under a network's latency: its FLOPs and bytes against the device's measured peak.

No implementation can run the network faster than ``max(FLOPs / peak FLOP/s, bytes / peak B/s)``
on a device, so a measured latency is judged against that floor rather than against a guess.
FLOPs are counted by PyTorch's ``FlopCounterMode`` on the deployed network (matrix products,
convolutions and attention; element-wise work is not counted). Bytes are the minimum any
implementation must move: the weights in the run's precision (int8: the linear layers' weights
in one byte, the rest in float32), the input batch and the outputs (intermediate activations are
left out, as a perfectly fused network would keep them on chip). The peaks are measured here, not
taken from a datasheet: the best of several large GEMMs for FLOP/s (for int8, ONNX Runtime's
uint8 x int8 GEMM, the kernel its quantised layers run) and of several large copies for bytes/s.
"""
import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from uncertain_seg_ros.inference.backend import PRECISIONS
from uncertain_seg_ros.inference.network import DeployedNetwork


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# PyTorch's counter knows the CUDA attention kernels but not the CPU one, so attention (a third of
# a ViT-S/14's work at 644x476) would count as free on the CPU.
_EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


def count_flops(module: nn.Module, *inputs: torch.Tensor) -> int:
    """FLOPs of one forward pass of ``module`` on ``inputs`` (a multiply-add counts as 2)."""
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    with torch.no_grad(), counter:
        module(*inputs)
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class NetworkCost:
    """Work of one network call on a batch: FLOPs (``int8_flops`` of them in int8) and the minimum bytes moved."""

    flops: int
    weight_bytes: int
    input_bytes: int
    output_bytes: int
    int8_flops: int = 0

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.input_bytes + self.output_bytes


def network_cost(network: DeployedNetwork, batch: int = 1, precision: str = "fp32") -> NetworkCost:
    """FLOPs and minimum bytes of ``network`` on ``batch`` frames, weights and outputs in ``precision``.

    The network is run once at batch 1 (FLOPs scale linearly with the batch: every operation is
    per frame). The input is the float32 batch every backend receives.
    """
    device = next(network.parameters()).device
    x = network.example(1, device=device)
    flops = count_flops(network, x)
    outputs, linear_flops = _run_counting_linear(network, x)
    int8_flops = linear_flops if precision == "int8" else 0
    itemsize = PRECISIONS[precision].itemsize
    used = network.inference_modules()
    weights = sum(p.numel() for m in used for p in m.parameters()) * itemsize
    if precision == "int8":  # the quantised linear layers' weights take one byte instead of four
        linear = [m for module in used for m in module.modules() if isinstance(m, nn.Linear)]
        weights -= sum(m.weight.numel() for m in linear) * (itemsize - 1)
    return NetworkCost(flops=flops * batch, weight_bytes=weights, input_bytes=x.numel() * x.element_size() * batch,
                       output_bytes=sum(o.numel() for o in outputs) * itemsize * batch, int8_flops=int8_flops * batch)


def _run_counting_linear(module: nn.Module, *inputs: torch.Tensor) -> tuple[object, int]:
    """``module``'s outputs and the FLOPs of its ``nn.Linear`` layers alone (the layers int8 quantises)."""
    total = 0

    def count(layer: nn.Linear, args: tuple, output: torch.Tensor) -> None:
        nonlocal total
        total += 2 * layer.in_features * output.numel()

    hooks = [m.register_forward_hook(count) for m in module.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            outputs = module(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return outputs, total


@dataclass(frozen=True)
class DevicePeak:
    """Measured peak arithmetic rate per precision (FLOP/s) and memory bandwidth (bytes/s) of a device."""

    device: str
    flops_per_s: dict[str, float]
    bytes_per_s: float
    gemm_size: int
    copy_bytes: int
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"device": self.device, "flops_per_s": self.flops_per_s, "bytes_per_s": self.bytes_per_s,
                "gemm_size": self.gemm_size, "copy_bytes": self.copy_bytes, **self.details}


def _best_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """The fastest of ``repeats`` timed calls of ``fn`` after one warm-up call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def measure_peak(device: str | torch.device, precisions: tuple[str, ...] = ("fp32",), gemm_size: int | None = None,
                 copy_mib: int | None = None, repeats: int = 5) -> DevicePeak:
    """Peak FLOP/s of an ``n x n`` GEMM per precision and copy bandwidth (read + write) of a large tensor.

    Defaults: n = 2048 and 256 MiB on the CPU, n = 8192 and 1 GiB on a GPU, large enough that the
    call overhead is negligible. fp16 is measured on CUDA only, int8 on the CPU only (with ONNX
    Runtime); float32 GEMMs run at the precision ``torch.get_float32_matmul_precision()`` allows
    (TF32 when set to "high"), as the backends do.
    """
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    n = gemm_size or (8192 if cuda else 2048)
    flops = {}
    for name in precisions:
        if (name == "fp16" and not cuda) or (name == "int8" and cuda):
            continue
        if name == "int8":
            if importlib.util.find_spec("onnxruntime") is not None:
                flops[name] = 2 * n**3 / _ort_int8_gemm_seconds(n, repeats)
            continue
        a = torch.randn(n, n, device=dev).to(PRECISIONS[name])
        b = torch.randn(n, n, device=dev).to(PRECISIONS[name])
        flops[name] = 2 * n**3 / _best_seconds(lambda: torch.mm(a, b), dev, repeats)
        del a, b
    numel = (copy_mib or (1024 if cuda else 256)) * 2**20 // 4
    src = torch.ones(numel, device=dev)
    dst = torch.empty_like(src)
    copy_s = _best_seconds(lambda: dst.copy_(src), dev, repeats)
    name = torch.cuda.get_device_name(dev) if cuda else _cpu_name()
    details = {"name": name, "threads": torch.get_num_threads(), "float32_matmul_precision": torch.get_float32_matmul_precision()}
    return DevicePeak(str(dev), flops, 2 * src.numel() * 4 / copy_s, n, src.numel() * 4, details)


def _ort_int8_gemm_seconds(n: int, repeats: int) -> float:
    """Fastest of ``repeats`` ONNX Runtime ``MatMulInteger`` calls, uint8 (n, n) x constant int8 (n, n), on the CPU."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    b = numpy_helper.from_array(rng.integers(-127, 128, (n, n), dtype=np.int8), "b")
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "int8_gemm",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])], initializer=[b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    a = rng.integers(0, 256, (n, n), dtype=np.uint8)
    return _best_seconds(lambda: session.run(None, {"a": a}), torch.device("cpu"), repeats)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def floor_seconds(cost: NetworkCost, peak: DevicePeak, precision: str) -> dict[str, float | str | None]:
    """The roofline floor of one call: compute time, memory time, their maximum and which one binds.

    Without a measured peak for ``precision`` (e.g. bf16 not measured) the fp32 peak is used. For
    int8, the quantised layers' FLOPs run at the int8 peak and the rest (attention, convolutions) at fp32's.
    """
    rate = peak.flops_per_s.get(precision) or peak.flops_per_s.get("fp32")
    compute = cost.flops / rate if rate else None
    fp32_rate = peak.flops_per_s.get("fp32")
    if precision == "int8" and rate and fp32_rate:
        compute = cost.int8_flops / rate + (cost.flops - cost.int8_flops) / fp32_rate
    memory = cost.bytes / peak.bytes_per_s
    floor = max(compute or 0.0, memory)
    return {"compute_s": compute, "memory_s": memory, "floor_s": floor,
            "bound": "compute" if compute is not None and compute >= memory else "memory"}
