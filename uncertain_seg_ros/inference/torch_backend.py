"""PyTorch backends: eager, and ``torch.compile`` (Inductor; CUDA graphs on the GPU).

Reduced precision runs under autocast, so normalisation layers and the softmax-facing outputs stay
in float32 where PyTorch's autocast rules keep them. The compiled variant compiles the whole
forward as one graph (``fullgraph=True``: a graph break is an error, not a silent slowdown) for
the fixed input size, and on CUDA replays it as a CUDA graph (``mode="reduce-overhead"``), which
removes the per-kernel launch cost that dominates a small ViT at batch 1. Every batch size up to
``max_batch`` is compiled at start-up, not at the first camera frame, on inference tensors as the
predictor's pre-processing makes them: TorchDynamo guards on a tensor's dispatch keys, so warming up
on ordinary tensors compiled graphs that the first real frames missed, and each batch size was
compiled again at run time (about 2 s per size on the CPU, seen as a 1.5-2 s first round in the node).
The guards include strides too: pre-processing hands over contiguous NCHW, and other callers'
inputs are made contiguous.
"""
import contextlib
import logging
import time

import torch

from .backend import Backend
from .network import DeployedNetwork

log = logging.getLogger(__name__)


class TorchBackend(Backend):
    def __init__(self, network: DeployedNetwork, device: torch.device, precision: str, max_batch: int, compile: bool) -> None:
        super().__init__(network, device, precision, max_batch)
        self.name = "torch_compile" if compile else "torch"
        self.compiled = compile
        self.cuda_graphs = compile and device.type == "cuda"
        self._fn = network
        if compile:
            mode = "reduce-overhead" if self.cuda_graphs else "default"
            self._fn = torch.compile(network, mode=mode, fullgraph=True, dynamic=False)
            start = time.perf_counter()
            for batch in range(1, max_batch + 1):
                log.info("torch.compile (%s, %s): compiling for batch %d of %d", mode, precision, batch, max_batch)
                with torch.inference_mode():
                    example = network.example(batch, device=device)
                for _ in range(3 if self.cuda_graphs else 1):  # CUDA graphs are recorded on a later call
                    self(example)
            log.info("torch.compile ready in %.1f s", time.perf_counter() - start)

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.compiled:  # the graphs were compiled for contiguous NCHW inputs (guards include strides)
            images = images.contiguous()
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with self._autocast():
            logits, loss = self._fn(images)
        if self.cuda_graphs:  # a CUDA graph's outputs are overwritten by its next replay
            logits, loss = logits.clone(), loss.clone()
        return logits, loss
