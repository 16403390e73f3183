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
from uncertain_seg_ros.metrics import CalibrationBins, ConfusionMatrix, MisclassificationCurves
from uncertain_seg_ros.model import UncertainSegmenter
from uncertain_seg_ros.prediction import decode
from uncertain_seg_ros.resources import resolve_bundle
from uncertain_seg_ros.preprocessing import to_input
from uncertain_seg_ros.uncertainty import UNCERTAINTY_SOURCES, uncertainty

from .datasets import LabelledFolder
from .distributed import all_reduce_sum, resolve_device

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """Accumulated statistics of one evaluation run."""

    confusion: ConfusionMatrix
    curves: dict[str, MisclassificationCurves]
    calibration: dict[str, CalibrationBins]
    mask_counts: torch.Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.float64))
    frame_count: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.float64))
    montage: list = field(default_factory=list)

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


@torch.no_grad()
def run_evaluation(
    model: UncertainSegmenter,
    config: BundleConfig,
    folder: LabelledFolder,
    device: torch.device,
    indices: list[int] | None = None,
    montage_count: int = 0,
    progress: bool = True,
) -> Evaluation:
    """Evaluate ``model`` on the frames ``indices`` of ``folder`` (all by default) at label resolution.

    In a torchrun job each process passes its own share of ``indices``; the totals are summed
    across processes before returning.
    """
    was_training = model.training
    model.eval()
    k = config.model.num_classes
    ev = Evaluation(
        confusion=ConfusionMatrix(k, None, device=device),
        curves={s: MisclassificationCurves(device=device) for s in UNCERTAINTY_SOURCES},
        calibration={"uncalibrated": CalibrationBins(15, device=device)},
        mask_counts=torch.zeros(3, dtype=torch.float64, device=device),
        frame_count=torch.zeros(1, dtype=torch.float64, device=device),
    )
    if config.calibration != Calibration():
        ev.calibration["calibrated"] = CalibrationBins(15, device=device)
    indices = list(range(len(folder))) if indices is None else indices
    shown = set(np.linspace(0, len(folder) - 1, montage_count).round().astype(int).tolist()) if montage_count else set()
    size = (config.input.height, config.input.width)
    for i in tqdm(indices, desc=f"evaluate {folder.root.name}", disable=not progress, unit="frame"):
        image, label = folder.read(i)
        target = torch.from_numpy(label).to(device)
        valid = (target >= 0) & (target < k)
        if config.ignore_index is not None:
            valid &= target != config.ignore_index
        x = to_input(torch.from_numpy(image).unsqueeze(0).to(device), size, config.input.mean, config.input.std)
        logits, loss = model(x)
        pred = decode(logits, loss, label.shape, config.calibration, config.uncertainty_source, config.mask_threshold, selector=model.selector)
        labels = pred.labels[0]
        error = (labels != target) & valid
        ev.confusion.update(labels[valid], target[valid])
        for source, curves in ev.curves.items():
            # the published source as decode published it; the others from the same calibrated probabilities
            u = pred.uncertainty if source == config.uncertainty_source else uncertainty(source, pred.probs, pred.predicted_loss)
            curves.update(u[0], error, valid)
        if "calibrated" in ev.calibration:
            ev.calibration["calibrated"].update(pred.confidence[0], ~error, valid)
            raw = decode(logits, loss, label.shape, Calibration(), config.uncertainty_source, config.mask_threshold)
            ev.calibration["uncalibrated"].update(raw.confidence[0], ~error, valid)
        else:
            ev.calibration["uncalibrated"].update(pred.confidence[0], ~error, valid)
        mask = pred.mask[0] & valid
        ev.mask_counts += torch.stack([(mask & error).sum(), mask.sum(), error.sum()]).double()
        ev.frame_count += 1
        if i in shown:
            ev.montage.append((folder.images[i].stem, image, label, labels.cpu().numpy(), pred.uncertainty[0].cpu().numpy(), pred.mask[0].cpu().numpy()))
    _reduce(ev)
    model.train(was_training)
    return ev


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
    indices = list(range(len(folder)))[:limit] if limit else None
    ev = run_evaluation(bundle.model, bundle.config, folder, dev, indices, montage_count)
    metrics = ev.metrics(bundle.config.class_names)
    metrics.update(
        bundle=str(bundle_path), model_id=bundle.model_id, data=str(data),
        uncertainty_source=bundle.config.uncertainty_source, mask_threshold=bundle.config.mask_threshold,
        calibration_method=bundle.config.calibration.method,
        temperature=bundle.config.calibration.temperature,
        selective_temperature=bundle.config.calibration.selective_temperature,
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
        notes=[f"Bundle `{bundle_path}` (model id {bundle.model_id}), data `{data}`, {ev.frames} frames.",
               f"Published uncertainty source: `{bundle.config.uncertainty_source}`, mask threshold {bundle.config.mask_threshold:.3f}."],
    )
    log.info("mIoU %.4f on %d frames; report in %s", metrics["miou"], ev.frames, out)
    return metrics
