"""TensorRT backend through Torch-TensorRT's dynamo path, the built program cached on disk.

Build: ``torch.export`` (strict, so the whole network is one graph) of the network in the target
precision -> ``torch_tensorrt.dynamo.compile`` with a batch range of 1..max_batch cameras ->
``torch_tensorrt.save`` as an ExportedProgram with the TensorRT engine embedded. Start-up then only
deserialises it (``torch_tensorrt.load``). Torch-TensorRT >= 2.9 builds strongly typed engines, so
fp16 is obtained by exporting the network in fp16 rather than by ``enabled_precisions``.
Building takes minutes; ``uncertain-seg build-engine`` does it ahead of time.
"""
import logging

import torch

from .artifact_cache import ArtifactCache, ArtifactKey, device_name
from .backend import Backend
from .network import DEPLOYED_FORM, DeployedNetwork, export_program, exportable

log = logging.getLogger(__name__)
PROGRAM_FILE = "trt_program.ep"


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, network: DeployedNetwork, device: torch.device, precision: str, max_batch: int,
                 cache: ArtifactCache, model_checksum: str) -> None:
        super().__init__(network, device, precision, max_batch)
        import tensorrt
        import torch_tensorrt

        if precision == "bf16":
            raise ValueError("the tensorrt backend builds fp16 or fp32 engines; bf16 is not supported")
        self._trt = torch_tensorrt
        self.key = ArtifactKey(
            model_checksum=model_checksum, backend=self.name,
            versions={"torch": torch.__version__, "torch_tensorrt": torch_tensorrt.__version__,
                      "tensorrt": tensorrt.__version__, "cuda": str(torch.version.cuda)},
            device=device_name(device), precision=precision,
            input_shape=(max_batch, 3, network.height, network.width), options={"network": DEPLOYED_FORM})
        folder = cache.get_or_build(self.key, self._build)
        self.module = torch_tensorrt.load(str(folder / PROGRAM_FILE)).module()

    def _build(self, out) -> None:
        trt = self._trt
        net = exportable(self.network).to(self.dtype)
        example = net.example(min(2, self.max_batch), dtype=self.dtype, device=self.device)
        log.info("TensorRT: exporting the network (torch.export, strict)")
        program = export_program(net, example, self.max_batch)
        h, w = self.network.height, self.network.width
        if self.max_batch == 1:
            spec = trt.Input(shape=(1, 3, h, w), dtype=self.dtype)
        else:
            spec = trt.Input(min_shape=(1, 3, h, w), opt_shape=(self.max_batch, 3, h, w),
                             max_shape=(self.max_batch, 3, h, w), dtype=self.dtype)
        log.info("TensorRT: building the %s engine for batch 1..%d at %dx%d", self.precision, self.max_batch, h, w)
        compiled = trt.dynamo.compile(program, arg_inputs=[spec], device=self.device, min_block_size=1,
                                      require_full_compilation=True, optimization_level=5,
                                      timing_cache_path=str(out / "timing_cache.bin"))
        trt.save(compiled, str(out / PROGRAM_FILE), output_format="exported_program", arg_inputs=[example])

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, loss = self.module(images.to(self.dtype).contiguous())
        return logits, loss
