"""Per-frame sufficient statistics of an evaluation, so that intervals can resample frames.

Every metric the evaluator reports is a function of summed counts: a confusion matrix, histograms
of uncertainty for misclassified and for correct pixels, calibration bins. Keeping those counts
per frame (at a coarser histogram resolution than the pooled evaluation's 10^4 bins, ``bins``)
makes the metrics of any multiset of frames (a test part, a bootstrap resample with repeats) the
metrics of the weighted sum of the frames' counts, computed by the same accumulators
(:mod:`uncertain_seg_ros.metrics`). Memory is fixed by frames x (K^2 + 2 bins per score + 3
ECE bins per calibration) numbers, allocated up front.
"""
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from uncertain_seg_ros.atomic_io import atomic_write_bytes
from uncertain_seg_ros.metrics import ECE_BINS, CalibrationBins, ConfusionMatrix, MisclassificationCurves


@dataclass
class FrameStatistics:
    """Counts per frame: ``confusion`` (F, K*K), ``curves[name]`` (F, 2*bins) errors then correct
    pixels per uncertainty bin, ``calibration[name]`` (F, 3, n_bins) pixels, correct pixels and sum of
    confidences per confidence bin. ``frames`` names the frames, in evaluation order."""

    frames: list[str]
    num_classes: int
    bins: int
    confusion: np.ndarray
    curves: dict[str, np.ndarray]
    calibration: dict[str, np.ndarray]

    @classmethod
    def allocate(cls, frames: list[str], num_classes: int, bins: int, curves: list[str], calibration: list[str],
                 ece_bins: int = ECE_BINS) -> "FrameStatistics":
        n = len(frames)
        return cls(list(frames), num_classes, bins, np.zeros((n, num_classes * num_classes), np.int64),
                   {c: np.zeros((n, 2 * bins), np.int64) for c in curves},
                   {c: np.zeros((n, 3, ece_bins), np.float64) for c in calibration})

    def record(self, row: int, confusion: ConfusionMatrix, curves: dict[str, MisclassificationCurves],
               calibration: dict[str, CalibrationBins]) -> None:
        """Store one frame's accumulators (those of that frame alone) in row ``row``."""
        self.confusion[row] = confusion.state()[0].cpu().numpy()
        for name, c in curves.items():
            if c.bins != self.bins:
                raise ValueError(f"curves {name!r} have {c.bins} bins, the frame statistics {self.bins}")
            self.curves[name][row] = c.state()[0].cpu().numpy()
        for name, b in calibration.items():
            self.calibration[name][row] = np.stack([t.cpu().numpy().astype(np.float64) for t in b.state()])

    def __len__(self) -> int:
        return len(self.frames)

    def _weights(self, weights: np.ndarray | None) -> np.ndarray:
        if weights is None:
            return np.ones(len(self), np.int64)
        weights = np.asarray(weights, dtype=np.int64)
        if weights.shape != (len(self),) or (weights < 0).any():
            raise ValueError(f"weights must be {len(self)} non-negative counts, got shape {weights.shape}")
        return weights

    def pooled(self, weights: np.ndarray | None = None) -> tuple[ConfusionMatrix, dict, dict]:
        """Accumulators of the frames summed, frame ``i`` counted ``weights[i]`` times (all once when None):
        confusion, curves, calibration."""
        w = self._weights(weights).astype(np.float64)
        confusion = ConfusionMatrix(self.num_classes)
        confusion.load_state([torch.from_numpy(self._counts(w, "confusion", self.confusion))])
        curves = {}
        for name, h in self.curves.items():
            curves[name] = MisclassificationCurves(self.bins)
            curves[name].load_state([torch.from_numpy(self._counts(w, name, h))])
        calibration = {}
        for name, c in self.calibration.items():
            total = np.tensordot(w.astype(np.float64), c, axes=1)
            calibration[name] = CalibrationBins(c.shape[-1])
            calibration[name].load_state([torch.from_numpy(np.rint(total[0])).long(), torch.from_numpy(np.rint(total[1])).long(),
                                          torch.from_numpy(total[2])])
        return confusion, curves, calibration

    def _counts(self, w: np.ndarray, key: str, counts: np.ndarray) -> np.ndarray:
        """``w @ counts`` as int64, through float64 (exact below 2^53; numpy has no fast integer matmul)."""
        cache = self.__dict__.setdefault("_float", {})
        if key not in cache:
            cache[key] = counts.astype(np.float64)
        return np.rint(w @ cache[key]).astype(np.int64)

    def image_ece(self, name: str, weights: np.ndarray | None = None) -> float:
        """Image-wise ECE: the (weighted) mean over frames of each frame's own ECE; frames without pixels skipped."""
        count, correct, conf_sum = (self.calibration[name][:, k] for k in range(3))
        n = count.sum(axis=1)
        per_frame = np.abs(correct - conf_sum).sum(axis=1) / np.maximum(n, 1)
        w = self._weights(weights) * (n > 0)
        return float((w * per_frame).sum() / w.sum()) if w.sum() else math.nan

    def metrics(self, weights: np.ndarray | None = None) -> dict:
        """mIoU, pixel accuracy, every score's detection numbers and every calibration's pooled and image-wise ECE."""
        confusion, curves, calibration = self.pooled(weights)
        return {
            "frames": int(self._weights(weights).sum()),
            "miou": confusion.miou(),
            "pixel_accuracy": confusion.pixel_accuracy(),
            "uncertainty": {name: c.to_dict() for name, c in curves.items()},
            "calibration": {name: {"ece": b.ece(), "ece_image": self.image_ece(name, weights)} for name, b in calibration.items()},
        }

    def subset(self, indices: list[int]) -> "FrameStatistics":
        """The statistics of the frames ``indices`` only, in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        return FrameStatistics([self.frames[i] for i in idx], self.num_classes, self.bins, self.confusion[idx],
                               {k: v[idx] for k, v in self.curves.items()}, {k: v[idx] for k, v in self.calibration.items()})

    def save(self, path: str | Path) -> Path:
        """Write a compressed ``.npz`` atomically."""
        arrays = {"frames": np.array(self.frames), "num_classes": np.array(self.num_classes), "bins": np.array(self.bins),
                  "confusion": self.confusion}
        arrays.update({f"curves/{k}": v.astype(np.int32) for k, v in self.curves.items()})
        arrays.update({f"calibration/{k}": v for k, v in self.calibration.items()})
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        return atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> "FrameStatistics":
        with np.load(path, allow_pickle=False) as z:
            return cls([str(f) for f in z["frames"]], int(z["num_classes"]), int(z["bins"]), z["confusion"].astype(np.int64),
                       {k.split("/", 1)[1]: z[k].astype(np.int64) for k in z.files if k.startswith("curves/")},
                       {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("calibration/")})
