"""OpenVINO backend: the network converted once to OpenVINO IR (cached), compiled for a CPU or an Intel GPU.

Build: ``torch.export`` (strict) of the :func:`~.network.exportable` network -> ``openvino.convert_model``
-> the input fixed to the deployed height and width and a batch of 1..max_batch cameras ->
``openvino.save_model`` (weights kept float32: OpenVINO's default would store them as float16) into
the artefact cache. Start-up reads the IR and compiles it for the OpenVINO device (``CPU``, or
``GPU`` for an Intel GPU) in about a second for the demo network; the compiled form is not cached.

Precisions. ``fp32``, ``bf16`` and ``fp16`` are OpenVINO's inference precision hint on the same IR,
each allowed only where the device reports it among its optimisation capabilities (a CPU without
AVX512-BF16 or AMX has no bf16; a CPU rarely has fp16). ``int8``: the backbone's linear layers' weights
stored as int8 per output channel (``nncf.compress_weights``, no calibration data; the heads stay
float32, see :data:`~.network.HEADS`), activations float32: OpenVINO's own quantisation of
activations per call, which it applies to int8 weights on CPUs with int8 dot products, is turned
off (``DYNAMIC_QUANTIZATION_GROUP_SIZE`` 0) so that the labels do not depend on the CPU; on an AMD
EPYC without VNNI both settings gave the same labels and speed. NNCF's static post-training quantisation (``nncf.quantize``, activations
quantised with ranges calibrated on frames) was measured first on the demo network and did not
qualify: on an AMD EPYC with AVX2 and no VNNI it took 80 ms against 68.5 ms for fp32 (one thread,
interleaved), and its patch labels matched PyTorch fp32 on 96.8% of 40 CamVid test frames,
calibrated on the five shipped dusk frames (97.8% without SmoothQuant and attention, 94.6% with 20
crops and flips as calibration data), below the 99.5% every precision must meet; weight-only int8
matched on 99.87% at fp32's speed there (measured on the day-trained demo of the time).

Threads. ``INFERENCE_NUM_THREADS`` is the node's ``threads`` (else PyTorch's thread count), one
stream, latency hint; ``ENABLE_CPU_PINNING`` is off: on a robot other nodes share the cores, and a
thread pinned to a core another process keeps busy cannot move to a free one.
"""
import logging
import re
from pathlib import Path

import torch

from .artifact_cache import ArtifactCache, ArtifactKey
from .backend import Backend, BackendUnavailable
from .network import DEPLOYED_FORM, HEADS, DeployedNetwork, export_program, exportable, head_linear_nodes

log = logging.getLogger(__name__)
MODEL_FILE = "model.xml"
# precision -> (OpenVINO's inference precision hint, the optimisation capability the device must report)
PRECISION_HINTS = {"fp32": ("f32", "FP32"), "bf16": ("bf16", "BF16"), "fp16": ("f16", "FP16"), "int8": ("f32", "FP32")}
INT8_SCHEME = f"weights int8 per channel (nncf.compress_weights INT8_ASYM), activations float, heads float ({'+'.join(HEADS)})"


def openvino_devices() -> list[str]:
    """The devices OpenVINO sees here (``CPU``, ``GPU.0``, ...)."""
    import openvino as ov

    return list(ov.Core().available_devices)


def device_reason(target: str) -> str | None:
    """None if OpenVINO can run on ``target`` here, else why not."""
    devices = openvino_devices()
    if target in devices or any(d.startswith(f"{target}.") for d in devices):
        return None
    kind = "Intel GPU" if target.startswith("GPU") else f"device {target}"
    return f"no {kind} (OpenVINO reports devices {devices})"


def precision_reason(target: str, precision: str) -> str | None:
    """None if ``target`` runs ``precision``, else why not (from the device's optimisation capabilities)."""
    import openvino as ov

    capabilities = list(ov.Core().get_property(target, "OPTIMIZATION_CAPABILITIES"))
    needed = PRECISION_HINTS[precision][1]
    if needed in capabilities:
        return None
    what = "this CPU has no" if target == "CPU" else f"OpenVINO device {target} has no"
    return f"{what} {precision} instructions (OpenVINO reports capabilities {capabilities})"


class OpenVINOBackend(Backend):
    name = "openvino"

    def __init__(self, network: DeployedNetwork, device: torch.device, precision: str, max_batch: int,
                 cache: ArtifactCache, model_checksum: str, threads: int | None = None, target: str = "CPU") -> None:
        super().__init__(network, device, precision, max_batch)
        import openvino as ov

        if device.type != "cpu":
            raise ValueError(f"the openvino backend takes its inputs in host memory: use device cpu (with openvino "
                             f"device GPU for an Intel GPU), not {device}")
        reason = device_reason(target) or precision_reason(target, precision)
        if reason is not None:
            raise BackendUnavailable(reason)
        versions = {"torch": torch.__version__, "openvino": ov.__version__}
        if precision == "int8":
            try:
                import nncf
            except ImportError as exc:
                raise BackendUnavailable("precision int8 on openvino needs NNCF: pip install nncf "
                                         "(or pip install 'uncertain_seg_ros[openvino]')") from exc
            versions["nncf"] = nncf.__version__
        core = ov.Core()
        self.target = target
        self.key = ArtifactKey(
            model_checksum=model_checksum, backend=self.name, versions=versions,
            device=f"{target} {core.get_property(target, 'FULL_DEVICE_NAME')}", precision=precision,
            input_shape=(max_batch, 3, network.height, network.width),
            options={"network": DEPLOYED_FORM, **({"int8": INT8_SCHEME} if precision == "int8" else {})})
        folder = cache.get_or_build(self.key, self._build)
        self.threads = threads or torch.get_num_threads()
        config = {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision][0], "PERFORMANCE_HINT": "LATENCY"}
        if target == "CPU":
            config.update(INFERENCE_NUM_THREADS=self.threads, NUM_STREAMS=1, ENABLE_CPU_PINNING=False)
            if precision == "int8":
                config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = 0  # activations stay float (see the module's docstring)
        self.compiled = core.compile_model(core.read_model(str(folder / MODEL_FILE)), target, config)
        self.request = self.compiled.create_infer_request()

    def _build(self, folder: Path) -> None:
        """The IR in ``folder``: exported, converted, shape fixed, int8 weights for int8."""
        import openvino as ov

        net = exportable(self.network)
        log.info("OpenVINO: exporting the network (torch.export, strict) and converting it")
        program = export_program(net, net.example(min(2, self.max_batch)), self.max_batch)
        model = ov.convert_model(program)
        batch = ov.Dimension(1, self.max_batch) if self.max_batch > 1 else ov.Dimension(1)
        model.reshape({model.inputs[0]: ov.PartialShape([batch, ov.Dimension(3), ov.Dimension(self.network.height),
                                                        ov.Dimension(self.network.width)])})
        if self.precision == "int8":
            model = _compress_int8(model, head_linear_nodes(program))
        ov.save_model(model, str(folder / MODEL_FILE), compress_to_fp16=False)

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.to(torch.float32).contiguous().numpy()
        results = self.request.infer({0: x}, share_inputs=True)  # the outputs come back as copies of their own
        logits, loss = (torch.from_numpy(results[out]) for out in self.compiled.outputs)
        return logits, loss

    def describe(self) -> str:
        return f"{self.name} {self.precision} on {self.target}"


def _compress_int8(model, float_nodes: set[str]):
    """``model`` with its linear layers' weights int8 per output channel (asymmetric), as NNCF stores them,
    but for those converted from the exported program's ``float_nodes`` (the heads, kept float32)."""
    import nncf

    if not float_nodes:
        raise ValueError(f"no linear layer of the heads {HEADS} found in the exported program; cannot keep them float32")
    # OpenVINO names an operation converted from an exported program's node "<node>/<aten op>/<op>"
    keep = nncf.IgnoredScope(patterns=[f"^{re.escape(name)}/" for name in sorted(float_nodes)])

    nncf_log = logging.getLogger("nncf")
    level = nncf_log.level
    nncf_log.setLevel(max(level, logging.WARNING))
    try:
        log.info("OpenVINO int8: compressing the linear layers' weights (%s)", INT8_SCHEME)
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM, ignored_scope=keep)
    finally:
        nncf_log.setLevel(level)
