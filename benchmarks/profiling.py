"""Where a frame's time goes in the predictor, and whether a backend still gives PyTorch fp32's answers.

A frame's path is split into stages, each a function of the previous stage's result: ``decode``
(the message payload to RGB with the project's image_encoding, as the node does), ``preprocess``
(upload, resize, normalise), ``inference`` (the backend's network call) and ``postprocess``
(decode, calibrate, uncertainty, colour, overlay, download). Callers append stages of their own
(the ROS benchmark adds message conversion and publishing). Every stage is timed with a wall clock
around it, the device synchronised after it, so a GPU's asynchronous work is charged to the stage
that queued it.
"""
import os
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from uncertain_seg_ros.image_encoding import compressed_to_rgb8, image_to_rgb8
from uncertain_seg_ros.inference.predictor import FrameOutputs, Predictor

STAGES = ("decode", "preprocess", "inference", "postprocess")
PAYLOAD_ENCODINGS = ("rgb8", "bgr8", "jpeg")
Stage = tuple[str, Callable[[Any], Any]]


@dataclass(frozen=True)
class CameraPayload:
    """A camera frame as a message carries it: raw ``rgb8``/``bgr8`` rows, or ``jpeg`` bytes."""

    encoding: str
    height: int
    width: int
    data: bytes

    @classmethod
    def from_rgb(cls, rgb: np.ndarray, encoding: str) -> "CameraPayload":
        if encoding not in PAYLOAD_ENCODINGS:
            raise ValueError(f"payload encoding must be one of {PAYLOAD_ENCODINGS}, got {encoding!r}")
        h, w = rgb.shape[:2]
        if encoding == "rgb8":
            return cls(encoding, h, w, np.ascontiguousarray(rgb).tobytes())
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        if encoding == "bgr8":
            return cls(encoding, h, w, bgr.tobytes())
        ok, jpeg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])
        if not ok:
            raise ValueError("JPEG encoding failed")
        return cls(encoding, h, w, jpeg.tobytes())

    @property
    def compressed(self) -> bool:
        return self.encoding == "jpeg"

    @property
    def step(self) -> int:
        return 0 if self.compressed else self.width * 3

    def decode(self) -> np.ndarray:
        """(H, W, 3) uint8 RGB, exactly as the node decodes the message."""
        if self.compressed:
            return compressed_to_rgb8(self.encoding, self.data)
        return image_to_rgb8(self.encoding, self.height, self.width, self.step, False, self.data)


def predictor_stages(predictor: Predictor, wanted: set[str]) -> list[Stage]:
    """The predictor's path for a batch of payloads (one per camera) as timed stages."""
    def postprocess(prepared_and_out):
        prepared, network_out = prepared_and_out
        return predictor.finish(prepared, network_out, Predictor.check_wanted(wanted, len(prepared.uploaded)))

    return [
        ("decode", lambda payloads: [p.decode() for p in payloads]),
        ("preprocess", predictor.prepare),
        ("inference", lambda prepared: (prepared, predictor.infer(prepared))),
        ("postprocess", postprocess),
    ]


def time_stages(stages: Sequence[Stage], batches: Iterable[Any], device: str | torch.device, warmup: int = 2,
                desc: str | None = None) -> dict[str, list[float]]:
    """Run ``stages`` on each batch in turn; seconds per stage per batch, plus ``total``.

    The first ``warmup`` batches run untimed (allocator, lazy initialisation, caches).
    """
    return time_pipelines({None: stages}, batches, device, warmup, desc)[None]


def time_pipelines(pipelines: Mapping[Hashable, Sequence[Stage]], batches: Iterable[Any], device: str | torch.device,
                   warmup: int = 2, desc: str | None = None,
                   settle: Callable[[], None] | None = None) -> dict[Hashable, dict[str, list[float]]]:
    """:func:`time_stages` for several pipelines (e.g. backends), interleaved batch by batch.

    Each batch goes through every pipeline before the next batch, the order rotating, so a change
    in background load during the measurement affects every pipeline alike and their ratios stay
    fair. ``settle`` runs untimed after each pipeline's round: work that a stage leaves running in
    the background (a subscriber in this process taking what was published) finishes there
    instead of slowing the next round's first stage.
    """
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    keys = list(pipelines)
    samples = {k: {**{name: [] for name, _ in pipelines[k]}, "total": []} for k in keys}
    for i, batch in enumerate(tqdm(list(batches), desc=desc, leave=False, disable=desc is None)):
        for key in keys[i % len(keys):] + keys[: i % len(keys)]:
            value, times = batch, {}
            sync()
            for name, fn in pipelines[key]:
                start = time.perf_counter()
                value = fn(value)
                sync()
                times[name] = time.perf_counter() - start
            if settle is not None:
                settle()
            if i >= warmup:
                for name, seconds in times.items():
                    samples[key][name].append(seconds)
                samples[key]["total"].append(sum(times.values()))
    return samples


def summarize(seconds: Sequence[float]) -> dict[str, float | int | None]:
    """Median, 95th percentile, mean and minimum in milliseconds, and the sample count."""
    if len(seconds) == 0:
        return {"median_ms": None, "p95_ms": None, "mean_ms": None, "min_ms": None, "n": 0}
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {"median_ms": float(np.median(ms)), "p95_ms": float(np.percentile(ms, 95)), "mean_ms": float(ms.mean()),
            "min_ms": float(ms.min()), "n": int(ms.size)}


class OtherLoad:
    """CPU used by other processes while a measurement runs, in cores (Linux; None elsewhere).

    Timings on a shared machine mean little without it: machine-wide busy time from /proc/stat,
    minus this process's own CPU time and that of ``pids`` (e.g. the node process being measured),
    divided by the wall time. 2.0 on a 2-core machine: somebody else kept both cores busy.
    ``steal``: cores' worth of time the hypervisor gave to other virtual machines (a VM's CPUs can
    be slowed by neighbours that no process list shows).
    """

    def __init__(self, pids: Sequence[int] = ()) -> None:
        self.pids = list(pids)
        self.cores: float | None = None
        self.steal: float | None = None

    def _sample(self) -> tuple[float, float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
            ticks = os.sysconf("SC_CLK_TCK")
            mine = sum(os.times()[:2])
            for pid in self.pids:
                with open(f"/proc/{pid}/stat") as f:
                    stat = f.read().rsplit(")", 1)[1].split()
                mine += (int(stat[11]) + int(stat[12])) / ticks
        except (OSError, ValueError, IndexError):
            return None
        busy = (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / ticks  # user nice system irq softirq
        steal = fields[7] / ticks if len(fields) > 7 else 0.0
        return time.monotonic(), busy, mine, steal

    def __enter__(self) -> "OtherLoad":
        self._start = self._sample()
        return self

    def __exit__(self, *exc) -> None:
        end = self._sample()
        if self._start is not None and end is not None and end[0] > self._start[0]:
            wall, busy, mine, steal = (e - s for e, s in zip(end, self._start))
            self.cores = max(0.0, (busy - mine) / wall)
            self.steal = max(0.0, steal / wall)


def reference_outputs(predictor: Predictor, frames: Sequence[np.ndarray], batch: int = 1,
                      desc: str | None = None) -> list[FrameOutputs]:
    """Labels and uncertainty of every frame, ``batch`` frames per call (the reference for :func:`agreement`)."""
    out: list[FrameOutputs] = []
    for i in tqdm(range(0, len(frames), batch), desc=desc, leave=False, disable=desc is None):
        out += predictor.run(list(frames[i : i + batch]), {"labels", "uncertainty"})
    return out


def agreement(reference: Sequence[FrameOutputs], candidate: Sequence[FrameOutputs]) -> dict[str, float | int]:
    """How closely ``candidate`` reproduces ``reference`` on the same frames.

    ``label_agreement``: fraction of all pixels with the same label; ``worst_frame``: the lowest
    per-frame fraction; ``max_uncertainty_diff``: the largest absolute uncertainty difference.
    """
    if len(reference) != len(candidate) or not reference:
        raise ValueError(f"{len(candidate)} outputs to compare with {len(reference)} reference outputs")
    same = total = 0
    worst, diff = 1.0, 0.0
    for ref, out in zip(reference, candidate):
        equal = int(np.count_nonzero(ref.labels == out.labels))
        same, total = same + equal, total + ref.labels.size
        worst = min(worst, equal / ref.labels.size)
        diff = max(diff, float(np.abs(ref.uncertainty - out.uncertainty).max()))
    return {"label_agreement": same / total, "worst_frame": worst, "max_uncertainty_diff": diff, "frames": len(reference)}
