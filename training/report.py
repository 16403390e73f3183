"""Evaluation report: a folder a person opens to judge a model's segmentation and its uncertainty.

``write_report`` writes ``metrics.json``, ``report.md`` and five figures (the legend: class colours
and the uncertainty colour map; reliability diagrams, precision-recall and ROC curves of
misclassification detection, an example montage with the legend under it). Every file is
written atomically, so a report folder being refreshed never shows a half-written file.
"""
import io
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from uncertain_seg_ros.atomic_io import atomic_write_bytes, atomic_write_text
from uncertain_seg_ros.colormap import colorize_labels, colorize_scalar, default_palette
from uncertain_seg_ros.legend import Legend
from uncertain_seg_ros.metrics import CalibrationBins, ConfusionMatrix, MisclassificationCurves
from uncertain_seg_ros.montage import fit, image_grid, tile_width

log = logging.getLogger(__name__)

FIGURES = {
    "legend.png": "Legend: class colours and the uncertainty colour map",
    "reliability.png": "Reliability diagrams",
    "pr_curves.png": "Precision-recall curves of misclassification detection",
    "roc_curves.png": "ROC curves of misclassification detection",
    "montage.png": "Examples",
}
MONTAGE_COLUMNS = ("input", "ground truth", "prediction", "uncertainty", "flagged", "errors")
MONTAGE_COLORMAP = "inferno"
_VOID_GREY = 128
LEGEND_WIDTH = 900


@dataclass
class MontageRow:
    """One example of the montage: the input, its labels, the prediction and its uncertainty.

    ``image`` (H, W, 3) uint8 RGB; ``target`` and ``prediction`` (H, W) int (the target may hold
    the ignore index); ``uncertainty`` (H, W) float in [0, 1]; ``mask`` (H, W) bool, True where the
    pixel is flagged as likely misclassified.
    """

    image: np.ndarray
    target: np.ndarray
    prediction: np.ndarray
    uncertainty: np.ndarray
    mask: np.ndarray
    name: str = ""


def metrics_dict(
    confusion: ConfusionMatrix,
    curves: Mapping[str, MisclassificationCurves],
    calibration: Mapping[str, CalibrationBins],
    class_names: list[str],
    **extra: Any,
) -> dict[str, Any]:
    """The ``metrics`` layout ``write_report`` expects, from the streaming accumulators (+ extra keys)."""
    iou = confusion.iou()
    return {
        **extra,
        "miou": confusion.miou(),
        "pixel_accuracy": confusion.pixel_accuracy(),
        "per_class_iou": {name: _finite_or_none(v) for name, v in zip(class_names, iou)},
        "uncertainty": {source: c.to_dict() for source, c in curves.items()},
        "calibration": {name: b.to_dict() for name, b in calibration.items()},
    }


def write_report(
    out_dir: Path,
    title: str,
    metrics: dict,
    curves: dict[str, MisclassificationCurves],
    calibration: dict[str, CalibrationBins],
    montage_rows: list[MontageRow],
    class_names: list[str],
    notes: list[str] | None = None,
    *,
    palette: np.ndarray | None = None,
    ignore_index: int | None = None,
    mask_threshold: float | None = None,
) -> Path:
    """Write the report folder ``out_dir`` and return the path of its ``report.md``.

    ``metrics`` layout (see :func:`metrics_dict`)::

        {"miou": float, "pixel_accuracy": float,
         "per_class_iou": {class_name: float | None},
         "uncertainty": {source: MisclassificationCurves.to_dict()},
         "calibration": {name: CalibrationBins.to_dict()},
         ...}   # any other keys are copied verbatim into metrics.json and listed in report.md

    ``curves`` (one per uncertainty source) and ``calibration`` (e.g. "uncalibrated",
    "temperature") feed the figures; where ``metrics`` lacks "uncertainty" / "calibration" the
    tables are filled from them. ``palette`` (K, 3) uint8 colours the labels (a default one of
    ``len(class_names)`` colours otherwise); ``ignore_index`` marks void pixels in the target;
    ``mask_threshold`` (the one that made the rows' masks) is marked on the legend's colour bar.
    NaN is written as null in metrics.json.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    palette = default_palette(len(class_names)) if palette is None else np.asarray(palette, dtype=np.uint8)

    json_text = json.dumps(_jsonable(metrics), indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write_text(out_dir / "metrics.json", json_text)
    atomic_write_bytes(out_dir / "reliability.png", _figure_png(_reliability_figure(calibration)))
    atomic_write_bytes(out_dir / "pr_curves.png", _figure_png(_pr_figure(curves)))
    atomic_write_bytes(out_dir / "roc_curves.png", _figure_png(_roc_figure(curves)))
    legend = montage_legend(class_names, palette, ignore_index, mask_threshold)
    atomic_write_bytes(out_dir / "legend.png", _png(legend.render(LEGEND_WIDTH)))
    montage = montage_image(montage_rows, palette, ignore_index, class_names, mask_threshold)
    atomic_write_bytes(out_dir / "montage.png", _png(montage))
    markdown = _markdown(title, metrics, curves, calibration, class_names, notes, legend.markdown())
    report = atomic_write_text(out_dir / "report.md", markdown)
    log.info("evaluation report written to %s", out_dir)
    return report


def _png(image: np.ndarray) -> bytes:
    ok, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding of a report picture failed")
    return png.tobytes()


def _finite_or_none(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy scalars and arrays unwrapped, NaN / inf as None."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _finite_or_none(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _new_figure(width: float, height: float) -> Figure:
    """A figure on the Agg canvas, outside pyplot: no global backend state, nothing to close."""
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _figure_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _empty_figure(message: str) -> Figure:
    fig = _new_figure(5, 3)
    ax = fig.subplots()
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center")
    return fig


def _reliability_figure(calibration: Mapping[str, CalibrationBins]) -> Figure:
    """One column per calibration: accuracy bars against the diagonal, the gap shaded, counts below."""
    if not calibration:
        return _empty_figure("no calibration data")
    n = len(calibration)
    fig = _new_figure(4.2 * n, 5.2)
    axes = fig.subplots(2, n, squeeze=False, gridspec_kw={"height_ratios": [3, 1]}, sharex="col")
    for col, (name, bins) in enumerate(calibration.items()):
        rel = bins.reliability()
        lower, width = rel["bin_lower"], rel["bin_upper"] - rel["bin_lower"]
        filled = rel["count"] > 0
        acc = np.where(filled, rel["accuracy"], 0.0)
        conf = np.where(filled, rel["confidence"], 0.0)
        top, bottom = axes[0, col], axes[1, col]
        top.bar(lower, acc, width=width, align="edge", color="tab:blue", edgecolor="black", lw=0.5, label="accuracy")
        top.bar(
            lower[filled], (conf - acc)[filled], bottom=acc[filled], width=width[filled], align="edge",
            color="tab:red", alpha=0.3, hatch="//", edgecolor="tab:red", lw=0.5, label="gap to confidence",
        )
        top.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=f"{name}  (ECE {_fmt(bins.ece())})")
        top.legend(loc="upper left", fontsize=8)
        bottom.bar(lower, rel["count"], width=width, align="edge", color="grey", edgecolor="black", lw=0.5)
        if rel["count"].any():
            bottom.set_yscale("log")
        bottom.set(xlim=(0, 1), xlabel="confidence", ylabel="pixels")
    fig.tight_layout()
    return fig


def _pr_figure(curves: Mapping[str, MisclassificationCurves]) -> Figure:
    if not curves:
        return _empty_figure("no uncertainty sources")
    fig = _new_figure(5.5, 4.5)
    ax = fig.subplots()
    for source, c in curves.items():
        precision, recall = c.pr_curve()
        ax.step(recall, precision, where="post", label=f"{source} (AUPR {_fmt(c.aupr())})")
    error_rate = next(iter(curves.values())).error_rate()
    if math.isfinite(error_rate):
        ax.axhline(error_rate, color="grey", ls=":", lw=1, label=f"chance ({_fmt(error_rate)})")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall (misclassified pixels found)", ylabel="precision",
           title="Misclassification detection: precision-recall")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def _roc_figure(curves: Mapping[str, MisclassificationCurves]) -> Figure:
    if not curves:
        return _empty_figure("no uncertainty sources")
    fig = _new_figure(5.5, 4.5)
    ax = fig.subplots()
    for source, c in curves.items():
        fpr, tpr = c.roc_curve()
        ax.plot(fpr, tpr, label=f"{source} (AUROC {_fmt(c.auroc())})")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="false positive rate", ylabel="true positive rate",
           title="Misclassification detection: ROC")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def _row_tiles(row: MontageRow, palette: np.ndarray, ignore_index: int | None, width: int) -> list[np.ndarray]:
    """The six RGB tiles of one example, each resized to ``width`` keeping the label aspect."""
    target = np.asarray(row.target)
    prediction = np.asarray(row.prediction)
    if target.shape != prediction.shape:
        raise ValueError(f"{row.name}: target {target.shape} and prediction {prediction.shape} differ")
    void = (target < 0) | (target >= len(palette))
    if ignore_index is not None:
        void |= target == ignore_index
    errors = np.where(void, _VOID_GREY, np.where(prediction != target, 255, 0)).astype(np.uint8)
    flagged = np.where(np.asarray(row.mask, dtype=bool), 255, 0).astype(np.uint8)
    return [
        fit(row.image, width),
        fit(colorize_labels(target, palette), width, nearest=True),
        fit(colorize_labels(prediction, palette), width, nearest=True),
        fit(colorize_scalar(np.asarray(row.uncertainty)), width),
        fit(flagged, width, nearest=True),
        fit(errors, width, nearest=True),
    ]


def montage_legend(class_names: list[str] | None, palette: np.ndarray, ignore_index: int | None = None,
                   mask_threshold: float | None = None) -> Legend:
    """The key to the montage's columns: class swatches (+ void), the colour bar, what white and grey mean."""
    flagged = f"uncertainty > {mask_threshold:.3f}" if mask_threshold is not None else "uncertainty above the mask threshold"
    return Legend(
        class_names or [], palette, MONTAGE_COLORMAP, mask_threshold,
        extra_items=[("void (not scored)", (0, 0, 0))] if ignore_index is not None else [],
        notes=[f"flagged: white = {flagged};  errors: white = prediction wrong, black = right, grey = void"],
    )


def montage_image(rows: list[MontageRow], palette: np.ndarray, ignore_index: int | None = None,
                  class_names: list[str] | None = None, mask_threshold: float | None = None) -> np.ndarray:
    """An RGB uint8 montage: column titles on top, one named row of six tiles per example, the legend below.

    Columns: input, ground truth and prediction (palette colours, void black), uncertainty
    (inferno, 0..1), flagged pixels (white), actual errors (white = wrong, grey = void). The legend
    (:func:`montage_legend`) names each class colour (``class_names``, else ``class <id>``) and shows
    the colour bar with ``mask_threshold`` on it.
    """
    widest = max(np.asarray(r.target).shape[1] for r in rows) if rows else None
    width = tile_width(len(MONTAGE_COLUMNS), widest)
    grid = image_grid(list(MONTAGE_COLUMNS), [(r.name, _row_tiles(r, palette, ignore_index, width)) for r in rows], width)
    return montage_legend(class_names, palette, ignore_index, mask_threshold).below(grid)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.{digits}f}" if math.isfinite(value) else "n/a"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines + [""]


def _scalars(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Scalar entries of a nested dict, keyed by dotted paths (lists are left to metrics.json)."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            out.update(_scalars(value, f"{prefix}{key}."))
        elif not isinstance(value, (list, tuple, np.ndarray)):
            out[f"{prefix}{key}"] = value
    return out


_LAYOUT_KEYS = {"miou", "pixel_accuracy", "per_class_iou", "uncertainty", "calibration"}


def _markdown(
    title: str,
    metrics: Mapping[str, Any],
    curves: Mapping[str, MisclassificationCurves],
    calibration: Mapping[str, CalibrationBins],
    class_names: list[str],
    notes: list[str] | None,
    legend_line: str = "",
) -> str:
    uncertainty = metrics.get("uncertainty") or {s: c.to_dict() for s, c in curves.items()}
    calib = metrics.get("calibration") or {n: b.to_dict() for n, b in calibration.items()}
    lines = [f"# {title}", "", "## Headline metrics", ""]
    lines += _table(["metric", "value"], [
        ["mIoU", _fmt(metrics.get("miou"))],
        ["pixel accuracy", _fmt(metrics.get("pixel_accuracy"))],
    ])
    if uncertainty:
        lines += ["### Misclassification detection (misclassified = positive)", ""]
        lines += _table(
            ["uncertainty source", "max F0.5", "at threshold", "AUROC", "AUPR", "FPR@95%TPR", "error rate", "pixels"],
            [[s, _fmt(d.get("max_f05")), _fmt(d.get("max_f05_threshold")), _fmt(d.get("auroc")), _fmt(d.get("aupr")),
              _fmt(d.get("fpr95")), _fmt(d.get("error_rate")), _fmt(d.get("pixels"))] for s, d in uncertainty.items()],
        )
    if calib:
        lines += ["### Calibration", ""]
        lines += _table(
            ["calibration", "ECE", "accuracy", "mean confidence"],
            [[n, _fmt(d.get("ece")), _fmt(d.get("accuracy")), _fmt(d.get("mean_confidence"))]
             for n, d in calib.items()],
        )
    extra = _scalars({k: v for k, v in metrics.items() if k not in _LAYOUT_KEYS})
    if extra:
        lines += ["### Other", ""]
        lines += _table(["key", "value"], [[k, _fmt(v)] for k, v in sorted(extra.items())])
    per_class = metrics.get("per_class_iou") or {}
    lines += ["## Per-class IoU", ""]
    lines += _table(["id", "class", "IoU"], [[str(i), n, _fmt(per_class.get(n))] for i, n in enumerate(class_names)])
    lines += ["## Figures", ""]
    if legend_line:
        lines += [f"Legend. {legend_line}", ""]
    for file, caption in FIGURES.items():
        lines += [f"### {caption}", "", f"![{caption}]({file})", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    return "\n".join(lines)
