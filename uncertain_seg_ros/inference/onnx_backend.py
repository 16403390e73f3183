"""ONNX Runtime backend: the network exported to ONNX once (cached), run by ONNX Runtime.

On the CPU the batch goes in as a NumPy view of the tensor (no copy) and the outputs come back as
tensors over ONNX Runtime's arrays. On CUDA (an onnxruntime build with the CUDA execution
provider) inputs and outputs are bound to PyTorch's device memory with I/O binding, so nothing
crosses to the host. The graph has a dynamic batch axis, so several cameras share one call.
Precision ``int8`` (CPU only) runs the graph with its linear layers quantised (see
:mod:`.quantization`); inputs and outputs stay float32. Attention and GELU are exported as ONNX
Runtime's fused operators (see :mod:`.onnx_contrib_ops`), so the graph is for ONNX Runtime, not any
ONNX runtime.
"""
import logging
from pathlib import Path

import numpy as np
import torch

from .artifact_cache import ArtifactCache, ArtifactKey, device_name
from .backend import Backend
from .network import DEPLOYED_FORM, DeployedNetwork, exportable
from .onnx_contrib_ops import CONTRIB_OPS, contrib_translation
from .quantization import quantisation_options, quantise_dynamic_int8

log = logging.getLogger(__name__)
MODEL_FILE = "model.onnx"
INPUT, OUTPUTS = "images", ("logits", "predicted_loss")
OPSET = 18


def export_onnx(network: DeployedNetwork, path: str | Path, dtype: torch.dtype = torch.float32, max_batch: int = 1) -> Path:
    """Write ``network`` (its :func:`~.network.exportable` form) as an ONNX graph (TorchDynamo exporter, attention
    and GELU fused) with a dynamic batch axis up to ``max_batch``."""
    path = Path(path)
    net = exportable(network).to(dtype)
    device = next(net.parameters()).device
    example = network.example(min(2, max_batch), dtype=dtype, device=device)
    dynamic = {"images": {0: torch.export.Dim("batch", min=1, max=max(max_batch, 2))}} if max_batch > 1 else None
    quiet = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.WARNING)
    try:
        with torch.no_grad():
            program = torch.onnx.export(net, (example,), dynamo=True, input_names=[INPUT], output_names=list(OUTPUTS),
                                        dynamic_shapes=dynamic, opset_version=OPSET, external_data=False, verbose=False,
                                        custom_translation_table=contrib_translation())
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    program.save(str(path))
    return path


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, network: DeployedNetwork, device: torch.device, precision: str, max_batch: int,
                 cache: ArtifactCache, model_checksum: str, threads: int | None = None) -> None:
        super().__init__(network, device, precision, max_batch)
        import onnx
        import onnxruntime as ort

        if precision == "bf16":
            raise ValueError("the onnxruntime backend runs fp32 (CPU, CUDA), fp16 (CUDA) or int8 (CPU); bf16 is not supported")
        if precision == "int8" and device.type != "cpu":
            raise ValueError("precision int8 runs on the CPU only (ONNX Runtime's dynamically quantised operators)")
        self.key = ArtifactKey(
            model_checksum=model_checksum, backend=self.name,
            versions={"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__, "opset": str(OPSET)},
            device=device_name(device), precision=precision,
            input_shape=(max_batch, 3, network.height, network.width),
            options={"network": DEPLOYED_FORM, "contrib_ops": CONTRIB_OPS,
                     **(quantisation_options() if precision == "int8" else {})})
        folder = cache.get_or_build(self.key, lambda out: self._build(out, network, max_batch))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if device.type == "cpu":
            options.intra_op_num_threads = threads or torch.get_num_threads()
            # ONNX Runtime's pool spins after each run; the calibration, colouring and publishing that follow
            # in PyTorch and DDS then share the cores with spinning threads (on 2 cores: post-processing
            # 120 ms instead of 76, inference 67 instead of 73 ms).
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(folder / MODEL_FILE), options, providers=providers)
        self.np_dtype = np.float16 if precision == "fp16" else np.float32

    def _build(self, folder: Path, network: DeployedNetwork, max_batch: int) -> Path:
        """The ONNX graph in ``folder``: exported in the run's float type, then quantised for int8."""
        if self.precision != "int8":
            return export_onnx(network, folder / MODEL_FILE, self.dtype, max_batch)
        exported = export_onnx(network, folder / "float32.onnx", torch.float32, max_batch)
        log.info("onnxruntime int8: quantising the linear layers (%s)", quantisation_options())
        quantise_dynamic_int8(exported, folder / MODEL_FILE)
        exported.unlink()
        return folder / MODEL_FILE

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.to(self.dtype).contiguous()
        if self.device.type == "cpu":
            logits, loss = self.session.run(list(OUTPUTS), {INPUT: x.numpy()})
            return torch.from_numpy(logits), torch.from_numpy(loss)
        return self._run_cuda(x)

    def _run_cuda(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """I/O binding to PyTorch tensors: the input and both outputs stay in device memory."""
        b, patch = x.shape[0], self.network.model.backbone.patch_size
        grid = (self.network.height // patch, self.network.width // patch)
        logits = torch.empty((b, self.network.model.cfg.num_classes, *grid), dtype=self.dtype, device=self.device)
        loss = torch.empty((b, 1, *grid), dtype=self.dtype, device=self.device)
        binding = self.session.io_binding()
        index = self.device.index or 0
        binding.bind_input(INPUT, "cuda", index, self.np_dtype, tuple(x.shape), x.data_ptr())
        for name, out in zip(OUTPUTS, (logits, loss)):
            binding.bind_output(name, "cuda", index, self.np_dtype, tuple(out.shape), out.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # ONNX Runtime runs on its own stream
        self.session.run_with_iobinding(binding)
        return logits, loss

