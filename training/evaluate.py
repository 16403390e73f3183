"""Streaming evaluation of a segmenter with uncertainty on a labelled folder.

Constant memory: a confusion matrix, per-source uncertainty histograms and calibration bins are
accumulated frame by frame; only the handful of frames shown in the montage are kept.
"""
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from uncertain_seg_ros.bundle import BundleConfig, load_bundle
from uncertain_seg_ros.calibration import Calibration
from uncertain_seg_ros.metrics import ECE_BINS, CalibrationBins, ConfusionMatrix, MisclassificationCurves
from uncertain_seg_ros.model import UncertainSegmenter
from uncertain_seg_ros.prediction import decode, upsample
from uncertain_seg_ros.resources import resolve_bundle
from uncertain_seg_ros.preprocessing import to_input
from uncertain_seg_ros.uncertainty import UNCERTAINTY_SOURCES, learned_uncertainty, uncertainty

from .datasets import LabelledFolder
from .distributed import all_reduce_sum, resolve_device
from .frame_stats import FrameStatistics

log = logging.getLogger(__name__)
CONFIDENCE_SOURCES = ("max_softmax", "entropy")  # the uncertainty sources that calibration changes


@dataclass
class Evaluation:
    """Accumulated statistics of one evaluation run.

    ``curves`` holds one entry per uncertainty source under the bundle's calibration ("max_softmax",
    "entropy", "learned"), then ``<variant>/max_softmax`` and ``<variant>/entropy`` per extra
    calibration variant and one entry per extra uncertainty head; ``calibration`` holds
    "uncalibrated", "calibrated" (when the bundle is calibrated) and one entry per variant.
    ``frame_stats`` keeps the same per frame when asked for.
    """

    confusion: ConfusionMatrix
    curves: dict[str, MisclassificationCurves]
    calibration: dict[str, CalibrationBins]
    mask_counts: torch.Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.float64))
    frame_count: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.float64))
    montage: list = field(default_factory=list)
    frame_stats: FrameStatistics | None = None

    @property
    def frames(self) -> int:
        return int(self.frame_count.item())

    def metrics(self, class_names: list[str]) -> dict:
        """The numbers of a report: mIoU, per-class IoU, detection and calibration per source."""
        iou = self.confusion.iou()
        flagged_errors, flagged, errors = self.mask_counts.cpu().tolist()
        return {
            "frames": self.frames,
            "miou": float(self.confusion.miou()),
            "pixel_accuracy": float(self.confusion.pixel_accuracy()),
            "per_class_iou": {n: (None if np.isnan(v) else float(v)) for n, v in zip(class_names, iou)},
            "confusion_matrix": self.confusion.matrix.tolist(),
            "uncertainty": {s: c.to_dict() for s, c in self.curves.items()},
            "calibration": {s: b.to_dict() for s, b in self.calibration.items()},
            "mask": {
                "precision": flagged_errors / flagged if flagged else float("nan"),
                "recall": flagged_errors / errors if errors else float("nan"),
                "flagged_fraction": flagged / max(1, self.confusion.matrix.sum()),
            },
        }


class _Accumulators:
    """One set of accumulators (confusion, curves per score, calibration bins), updated per frame."""

    def __init__(self, num_classes: int, curves: list[str], calibration: list[str], bins: int, device: torch.device) -> None:
        self.confusion = ConfusionMatrix(num_classes, None, device=device)
        self.curves = {c: MisclassificationCurves(bins, device=device) for c in curves}
        self.calibration = {c: CalibrationBins(ECE_BINS, device=device) for c in calibration}

    def update(self, labels: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, error: torch.Tensor,
               scores: dict[str, torch.Tensor], confidences: dict[str, torch.Tensor]) -> None:
        self.confusion.update(labels[valid], target[valid])
        for name, c in self.curves.items():
            c.update(scores[name], error, valid)
        for name, b in self.calibration.items():
            b.update(confidences[name], ~error, valid)


@torch.no_grad()
def run_evaluation(
    model: UncertainSegmenter,
    config: BundleConfig,
    folder: LabelledFolder,
    device: torch.device,
    indices: list[int] | None = None,
    montage_count: int = 0,
    progress: bool = True,
    *,
    variants: dict[str, tuple[Calibration, torch.nn.Module | None]] | None = None,
    heads: dict[str, torch.nn.Module] | None = None,
    frame_bins: int = 0,
) -> Evaluation:
    """Evaluate ``model`` on the frames ``indices`` of ``folder`` (all by default) at label resolution.

    ``variants`` adds other calibrations (name -> (calibration, selector or None)) of the same network
    outputs, ``heads`` other loss-prediction heads on the same features (their uncertainty is
    ``1 - exp(-predicted loss)``, like "learned"): one network pass serves them all. With
    ``frame_bins`` > 0, ``frame_stats`` keeps every accumulator per frame, the uncertainty histograms
    at ``frame_bins`` bins (in a torchrun job: this process's frames only). In a torchrun job each
    process passes its own share of ``indices``; the pooled totals are summed across processes.
    """
    was_training = model.training
    model.eval()
    k = config.model.num_classes
    variants, heads = variants or {}, heads or {}
    calibrated = config.calibration != Calibration()
    curve_names = [*UNCERTAINTY_SOURCES, *(f"{v}/{s}" for v in variants for s in CONFIDENCE_SOURCES), *heads]
    calibration_names = ["uncalibrated", *(["calibrated"] if calibrated else []), *variants]
    pooled = _Accumulators(k, curve_names, calibration_names, MisclassificationCurves().bins, device)
    ev = Evaluation(confusion=pooled.confusion, curves=pooled.curves, calibration=pooled.calibration,
                    mask_counts=torch.zeros(3, dtype=torch.float64, device=device),
                    frame_count=torch.zeros(1, dtype=torch.float64, device=device))
    indices = list(range(len(folder))) if indices is None else indices
    if frame_bins:
        ev.frame_stats = FrameStatistics.allocate([folder.images[i].stem for i in indices], k, frame_bins, curve_names, calibration_names)
    shown = {indices[j] for j in np.linspace(0, len(indices) - 1, montage_count).round().astype(int)} if montage_count else set()
    size = (config.input.height, config.input.width)
    for row, i in enumerate(tqdm(indices, desc=f"evaluate {folder.root.name}", disable=not progress, unit="frame")):
        image, label = folder.read(i)
        target = torch.from_numpy(label).to(device)
        valid = (target >= 0) & (target < k)
        if config.ignore_index is not None:
            valid &= target != config.ignore_index
        x = to_input(torch.from_numpy(image).unsqueeze(0).to(device), size, config.input.mean, config.input.std)
        if heads:
            features = model.features(x)
            logits, loss = model.head(features), model.uncertainty_head(features)
        else:
            logits, loss = model(x)
        pred = decode(logits, loss, label.shape, config.calibration, config.uncertainty_source, config.mask_threshold, selector=model.selector)
        labels = pred.labels[0]
        error = (labels != target) & valid
        # the published source as decode published it; the others from the same calibrated probabilities
        scores = {s: (pred.uncertainty if s == config.uncertainty_source else uncertainty(s, pred.probs, pred.predicted_loss))[0]
                  for s in UNCERTAINTY_SOURCES}
        confidences = {"uncalibrated": _decoded(logits, loss, label.shape, Calibration(), None).confidence[0]
                       if calibrated else pred.confidence[0]}
        if calibrated:
            confidences["calibrated"] = pred.confidence[0]
        for name, (calibration, selector) in variants.items():
            probs = _decoded(logits, loss, label.shape, calibration, selector).probs
            confidences[name] = probs.amax(dim=1)[0]
            scores.update({f"{name}/{s}": uncertainty(s, probs)[0] for s in CONFIDENCE_SOURCES})
        for name, head in heads.items():
            scores[name] = learned_uncertainty(upsample(head(features).float(), label.shape)[:, 0])[0]
        pooled.update(labels, target, valid, error, scores, confidences)
        if ev.frame_stats is not None:
            frame = _Accumulators(k, curve_names, calibration_names, frame_bins, device)
            frame.update(labels, target, valid, error, scores, confidences)
            ev.frame_stats.record(row, frame.confusion, frame.curves, frame.calibration)
        mask = pred.mask[0] & valid
        ev.mask_counts += torch.stack([(mask & error).sum(), mask.sum(), error.sum()]).double()
        ev.frame_count += 1
        if i in shown:
            ev.montage.append((folder.images[i].stem, image, label, labels.cpu().numpy(), pred.uncertainty[0].cpu().numpy(), pred.mask[0].cpu().numpy()))
    _reduce(ev)
    model.train(was_training)
    return ev


def _decoded(logits: torch.Tensor, loss: torch.Tensor, size: tuple[int, int], calibration: Calibration,
             selector: torch.nn.Module | None):
    """Another calibration of the same network outputs, decoded as the node would decode it."""
    return decode(logits, loss, size, calibration, "max_softmax", 1.0, selector=selector)


def _reduce(ev: Evaluation) -> None:
    """Sum every accumulator across torchrun processes."""
    parts = [ev.confusion, *ev.curves.values(), *ev.calibration.values()]
    states = [p.state() for p in parts]
    all_reduce_sum([t for s in states for t in s] + [ev.mask_counts, ev.frame_count])
    for p, s in zip(parts, states):
        p.load_state(s)


def evaluate(
    bundle_path: str | Path,
    data: str | Path,
    out: str | Path,
    device: str = "auto",
    montage_count: int = 6,
    limit: int | None = None,
    title: str | None = None,
    skip: int = 0,
) -> dict:
    """Evaluate a bundle on a labelled folder and write ``metrics.json`` + a Markdown report with plots."""
    from .report import MontageRow, write_report

    dev = resolve_device(device)
    bundle_path = resolve_bundle(bundle_path)
    bundle = load_bundle(bundle_path, dev)
    folder = LabelledFolder(data)
    if folder.classes.num_classes != bundle.config.model.num_classes:
        raise ValueError(
            f"{data} has {folder.classes.num_classes} classes but the bundle predicts {bundle.config.model.num_classes}"
        )
    if skip < 0 or skip >= len(folder):
        raise ValueError(f"--skip {skip} leaves none of the {len(folder)} frames of {data}")
    indices = list(range(len(folder)))[skip:][:limit] if limit or skip else None
    ev = run_evaluation(bundle.model, bundle.config, folder, dev, indices, montage_count)
    metrics = ev.metrics(bundle.config.class_names)
    metrics.update(
        bundle=str(bundle_path), model_id=bundle.model_id, data=str(data),
        uncertainty_source=bundle.config.uncertainty_source, mask_threshold=bundle.config.mask_threshold,
        calibration_method=bundle.config.calibration.method,
        temperature=bundle.config.calibration.temperature,
        selective_temperature=bundle.config.calibration.selective_temperature,
        skipped_frames=skip,
    )
    rows = [MontageRow(name=n, image=img, target=t, prediction=p, uncertainty=u, mask=m) for n, img, t, p, u, m in ev.montage]
    write_report(
        Path(out),
        title or f"Evaluation of {bundle.config.name} on {Path(data).name}",
        metrics,
        ev.curves,
        ev.calibration,
        rows,
        bundle.config.class_names,
        palette=bundle.config.palette,
        ignore_index=bundle.config.ignore_index,
        mask_threshold=bundle.config.mask_threshold,
        notes=[f"Bundle `{bundle_path}` (model id {bundle.model_id}), data `{data}`, {ev.frames} frames"
               + (f" (the folder's first {skip} frames, in name order, skipped)." if skip else "."),
               f"Published uncertainty source: `{bundle.config.uncertainty_source}`, mask threshold {bundle.config.mask_threshold:.3f}."],
    )
    log.info("mIoU %.4f on %d frames; report in %s", metrics["miou"], ev.frames, out)
    return metrics
