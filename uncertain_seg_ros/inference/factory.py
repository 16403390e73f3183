"""Which backends run here, ``auto`` (the fastest one this machine has), and building one for a bundle.

Every concrete backend is imported here, lazily (its libraries load only when it is built), and
each of them imports only the interface in :mod:`.backend`, so the dependency runs one way:
factory -> concrete backends -> interface.

``auto`` picks a backend, never a precision: the precision is the user's choice, and ``auto`` takes
the first backend of :data:`AUTO_ORDER` that is installed and runs that precision here. On CUDA:
TensorRT, then torch.compile with CUDA graphs, then eager PyTorch; on the CPU: OpenVINO, then eager
PyTorch (the measurements are beside the table); with int8: ONNX Runtime, then OpenVINO.
"""
import importlib.util
import shutil

import torch

from ..bundle import Bundle
from .artifact_cache import ArtifactCache
from .backend import PRECISIONS, Backend, BackendUnavailable
from .network import DeployedNetwork

BACKENDS = ("torch", "torch_compile", "onnxruntime", "tensorrt", "openvino")
# The CPU order, from benchmarks/results/inference_cpu.md (demo, batch 1, 2-core AMD EPYC with AVX2
# and no AVX-512, one run, inference medians):
# - at the node's default of 1 thread: OpenVINO 62.7 ms, ONNX Runtime 62.9, eager PyTorch 68.5;
# - at 2 threads: ONNX Runtime 38.4, OpenVINO 39.5, eager 39.5 (a 3% spread that changes order between
#   runs: the run before had eager 41.2, OpenVINO 42.3, ONNX Runtime 44.7);
# - at 2 threads with another process keeping one core busy: OpenVINO 64.0, ONNX Runtime 68.6, eager
#   81.1 (p95 144); every fp32 label equal to eager's;
# - issue 18's probe on an AMD EPYC with AVX512-BF16: eager 72.8 ms, OpenVINO 30.8 ms; ONNX Runtime fp32
#   was 0.96x eager on ViT-S/14 in an earlier committed run, so eager, not ONNX Runtime, comes second.
# `uncertain-seg benchmark` reports the backend auto picks beside the fastest fp32 row it measured;
# where committed runs disagree beyond their run-to-run spread, this table is what changes.
AUTO_ORDER = {"cuda": ("tensorrt", "torch_compile", "torch"), "cpu": ("openvino", "torch")}
# int8 is opt-in (it moves labels: 99.74% of the demo's pixels as fp32 with ONNX Runtime, 99.80% with
# OpenVINO, 202 CamVid frames); ONNX Runtime's int8 is 1.36x eager at 1 thread and 1.25x at 2 on the
# EPYC above, OpenVINO's int8 weights 1.06x and 0.97x (its int8 products need VNNI or AMX).
INT8_BACKENDS = ("onnxruntime", "openvino")


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def unavailable_reason(name: str, device: str | torch.device) -> str | None:
    """None if ``name`` can run on ``device`` here, else why not."""
    dev = torch.device(device)
    if name not in BACKENDS:
        return f"unknown backend {name!r}; choose one of {BACKENDS}"
    if dev.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    if name == "torch":
        return None
    if name == "torch_compile":
        if dev.type == "cpu" and shutil.which("c++") is None and shutil.which("g++") is None:
            return "torch.compile on the CPU needs a C++ compiler (c++/g++), none is on PATH"
        return None
    if name == "onnxruntime":
        if not (_has("onnxruntime") and _has("onnx") and _has("onnxscript")):
            return "onnxruntime/onnx/onnxscript are not installed (pip install 'uncertain_seg_ros[onnx]')"
        if dev.type == "cuda":
            import onnxruntime as ort

            if "CUDAExecutionProvider" not in ort.get_available_providers():
                return "the installed onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)"
        return None
    if name == "tensorrt":
        if dev.type != "cuda":
            return "TensorRT runs on NVIDIA GPUs only"
        if not _has("torch_tensorrt"):
            return "torch_tensorrt is not installed (pip install 'uncertain_seg_ros[tensorrt]', needs the TensorRT libraries)"
        try:
            import torch_tensorrt  # noqa: F401
        except Exception as e:  # the wheel imports, but TensorRT's shared libraries may be missing
            return f"torch_tensorrt does not load: {e}"
        return None
    if name == "openvino":
        if dev.type != "cpu":
            return "OpenVINO runs on the CPU and on Intel GPUs (device cpu, openvino_device GPU), not on CUDA devices"
        if not _has("openvino"):
            return "openvino is not installed (pip install 'uncertain_seg_ros[openvino]')"
        return None
    raise AssertionError(name)


def available_backends(device: str | torch.device) -> dict[str, str | None]:
    """Every backend with None (it runs here) or the reason it does not."""
    return {name: unavailable_reason(name, device) for name in BACKENDS}


def _precision_reason(name: str, precision: str) -> str | None:
    """Why ``auto`` passes over the available backend ``name`` for ``precision`` (None: it runs it)."""
    if name == "openvino":  # the one whose precisions depend on the CPU's instructions
        from .openvino_backend import precision_reason

        return precision_reason("CPU", precision)
    return None


def choose_backend(name: str, device: str | torch.device, precision: str = "fp32") -> str:
    """Resolve ``auto`` to the fastest available backend for ``precision``; check that an explicit one can run.

    ``auto`` never changes the precision: a backend that cannot run it here is passed over.
    """
    dev = torch.device(device)
    if name == "auto":
        order = INT8_BACKENDS if precision == "int8" else AUTO_ORDER["cuda" if dev.type == "cuda" else "cpu"]
        for candidate in order:
            if unavailable_reason(candidate, dev) is None and _precision_reason(candidate, precision) is None:
                return candidate
        raise BackendUnavailable(f"no backend can run {precision} on {dev}")
    reason = unavailable_reason(name, dev)
    if reason is not None:
        raise BackendUnavailable(f"backend {name!r} cannot run on {dev}: {reason}")
    return name


def create_backend(
    name: str,
    bundle: Bundle,
    device: str | torch.device,
    precision: str = "fp32",
    max_batch: int = 1,
    cache: ArtifactCache | None = None,
    threads: int | None = None,
    openvino_device: str = "CPU",
) -> Backend:
    """The bundle's network behind backend ``name`` (``auto`` allowed), built or loaded from ``cache``.

    ``auto`` with precision int8 means ONNX Runtime (OpenVINO where it is missing). ``threads``: the CPU threads ONNX Runtime and
    OpenVINO run the network with (None: PyTorch's thread count, which the PyTorch backends use; it
    is process-wide, so the caller sets it). ``openvino_device``: where the openvino backend runs the
    network (``CPU``, or ``GPU`` for an Intel GPU; its inputs stay on ``device``, the CPU).
    """
    dev = torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    if dev.type == "cpu" and precision == "fp16" and name != "openvino":
        raise ValueError("precision fp16 needs a CUDA device (or the openvino backend on a device with fp16); "
                         "use fp32, bf16 or int8 on the CPU")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if precision == "int8" and name not in ("auto", *INT8_BACKENDS):
        raise ValueError(f"precision int8 runs on the {' and '.join(INT8_BACKENDS)} backends only, not {name!r}")
    name = choose_backend(name, dev, precision)
    cfg = bundle.config
    network = DeployedNetwork(bundle.model.to(dev), cfg.input.height, cfg.input.width)
    cache = cache or ArtifactCache()
    if name == "torch":
        from .torch_backend import TorchBackend

        return TorchBackend(network, dev, precision, max_batch, compile=False)
    if name == "torch_compile":
        from .torch_backend import TorchBackend

        return TorchBackend(network, dev, precision, max_batch, compile=True)
    if name == "onnxruntime":
        from .onnx_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(network, dev, precision, max_batch, cache, bundle.model_checksum, threads)
    if name == "openvino":
        from .openvino_backend import OpenVINOBackend

        return OpenVINOBackend(network, dev, precision, max_batch, cache, bundle.model_checksum, threads, openvino_device)
    from .tensorrt_backend import TensorRTBackend

    return TensorRTBackend(network, dev, precision, max_batch, cache, bundle.model_checksum)
