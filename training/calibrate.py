"""``uncertain-seg calibrate``: fit a bundle's calibration and mask threshold on a held-out labelled
split, and write a new bundle. The fitting itself is in :mod:`.calibration_fit`; ECE before and
after comes from the evaluator (:func:`.evaluate.run_evaluation`, whole frames, the one ECE the
project reports), NLL from the fitted pixel sample.
"""
import argparse
import logging
import os
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from uncertain_seg_ros import __version__
from uncertain_seg_ros.bundle import load_bundle, save_bundle
from uncertain_seg_ros.calibration import CALIBRATION_METHODS, Calibration
from uncertain_seg_ros.metrics import ECE_BINS
from uncertain_seg_ros.resources import resolve_bundle

from .calibration_fit import (
    SELECTOR_WEIGHTINGS,
    SelectorOptions,
    calibrated_rows,
    collect_pixels,
    fit_calibration,
    fit_mask_threshold,
    sample_uncertainty,
)
from .datasets import LabelledFolder
from .distributed import resolve_device
from .evaluate import run_evaluation
from .output_folders import refuse_existing

log = logging.getLogger(__name__)


def _fpr_recall(u: torch.Tensor, error: torch.Tensor, t: float) -> tuple[float, float]:
    flagged = u > t
    correct = ~error
    fpr = float((flagged & correct).sum()) / max(1, int(correct.sum()))
    recall = float((flagged & error).sum()) / max(1, int(error.sum()))
    return fpr, recall


def _threshold_rule_text(rule: str | float) -> str:
    return "max F0.5 (gamma-SSL definitions)" if rule == "f05" else f"target false-positive rate {float(rule):g}"


def selection_frames(frames: int, fraction: float) -> int:
    """How many of the split's last frames choose the selector's step and ``T_sel``: ``round(fraction
    x frames)``, at least 1 when ``fraction`` > 0 (0: fit everything on all frames)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the selection fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return 0
    n = max(1, round(fraction * frames))
    if n >= frames:
        raise ValueError(f"{frames} frame(s) cannot be split into fitting and selection frames; use --selector-val-fraction 0")
    return n


def calibrate(
    bundle_path: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    device: str = "auto",
    method: str = "selective",
    threshold: str | float = "f05",
    pixels_per_frame: int = 20000,
    steps: int = 1000,
    seed: int = 0,
    selector_hidden: int = 64,
    progress: bool = True,
    selector_weighting: str = "balanced",
    selector_val_fraction: float = 0.3,
) -> Path:
    """Fit calibration and mask threshold of a bundle on the labelled folder ``data``; write a new bundle to ``out``.

    ``method``: "none", "temperature" or "selective"; the temperature is fitted in every case and
    reported. ``threshold``: "f05" or a target false-positive rate in (0, 1). Selective scaling:
    ``selector_weighting`` "balanced" or "duplicate"; the last ``selector_val_fraction`` of the
    frames (in name order) choose the selector's step and ``T_sel``. The input bundle is never
    modified; ``out`` is written atomically and must be another folder.
    """
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"method must be one of {CALIBRATION_METHODS}, got {method!r}")
    if threshold != "f05" and (isinstance(threshold, str) or not 0.0 < float(threshold) < 1.0):
        raise ValueError(f"threshold must be 'f05' or a target false-positive rate in (0, 1), got {threshold!r}")
    bundle_path = resolve_bundle(bundle_path)
    out = Path(out)
    if out.resolve() == Path(bundle_path).resolve():
        raise ValueError(f"--out {out} is the input bundle; calibration writes a new bundle and never modifies its input")
    dev = resolve_device(device)
    bundle = load_bundle(bundle_path, dev)
    cfg = bundle.config
    folder = LabelledFolder(data)
    if folder.classes.num_classes != cfg.model.num_classes:
        raise ValueError(f"{data} has {folder.classes.num_classes} classes but the bundle predicts {cfg.model.num_classes}")
    val_frames = selection_frames(len(folder), selector_val_fraction) if method == "selective" else 0

    sample = collect_pixels(bundle.model, cfg, folder, dev, pixels_per_frame, seed, progress)
    log.info("calibration sample: %d pixels from %d frames, error rate %.4f", len(sample.labels), sample.frames,
             float(sample.errors.float().mean()))
    options = SelectorOptions(val_frames, selector_weighting, selector_hidden, steps, seed)
    calibration, selector = fit_calibration(sample, method, options, dev, progress)
    fit = {"data": str(data), "pixels_per_frame": pixels_per_frame, "seed": seed, **calibration.fit}

    model = bundle.model
    model.set_selector(selector)
    uncalibrated = replace(cfg, calibration=Calibration())
    variants = {"temperature": (Calibration(fit["temperature_fit"]), None), "after": (calibration, selector)}
    ev = run_evaluation(model, uncalibrated, folder, dev, progress=progress, variants=variants)
    fit.update(ece_bins=ECE_BINS, ece_before=ev.calibration["uncalibrated"].ece(),
               ece_temperature=ev.calibration["temperature"].ece(), ece_after=ev.calibration["after"].ece())
    calibration = replace(calibration, fit=fit)
    log.info("temperature %.4f: NLL %.4f -> %.4f, ECE %.4f -> %.4f", fit["temperature_fit"], fit["nll_before"],
             fit["nll_temperature"], fit["ece_before"], fit["ece_temperature"])
    log.info("%s calibration: NLL %.4f -> %.4f, ECE %.4f -> %.4f", method, fit["nll_before"], fit["nll_after"],
             fit["ece_before"], fit["ece_after"])

    u = sample_uncertainty(cfg.uncertainty_source, calibrated_rows(calibration, selector, sample.logits), sample.predicted_loss)
    errors = sample.errors
    mask_threshold = fit_mask_threshold(u, errors, threshold)
    fpr, recall = _fpr_recall(u, errors, mask_threshold)
    log.info("mask threshold %.4f on %s uncertainty (%s): FPR %.4f, recall of errors %.4f",
             mask_threshold, cfg.uncertainty_source, _threshold_rule_text(threshold), fpr, recall)

    provenance = dict(cfg.provenance)
    provenance["calibration"] = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tool": f"uncertain_seg_ros {__version__}, torch {torch.__version__}",
        "input_bundle": {"path": str(bundle_path), "model_id": bundle.model_id, "name": cfg.name},
        "method": method,
        **fit,
        "uncertainty_source": cfg.uncertainty_source,
        "mask_threshold": mask_threshold,
        "threshold_rule": _threshold_rule_text(threshold),
        "mask_fpr": fpr,
        "mask_recall": recall,
    }
    new_cfg = replace(cfg, model=model.cfg, calibration=calibration, mask_threshold=mask_threshold, provenance=provenance)
    path = save_bundle(out, model, new_cfg)
    log.info("calibrated bundle written to %s", path)
    return path


def _run(args: argparse.Namespace) -> int:
    refuse_existing(args.out, args.overwrite)
    threshold: str | float = "f05" if args.mask_target_fpr is None else args.mask_target_fpr
    path = calibrate(args.bundle, args.data, args.out, args.device, args.method, threshold, args.pixels_per_frame,
                     args.selector_steps, args.seed, args.selector_hidden, selector_weighting=args.selector_weighting,
                     selector_val_fraction=args.selector_val_fraction)
    cal = load_bundle(path).config
    fit = cal.calibration.fit
    print(f"method {cal.calibration.method}: NLL {fit['nll_before']:.4f} -> {fit['nll_after']:.4f}, "
          f"ECE {fit['ece_before']:.4f} -> {fit['ece_after']:.4f} ({fit['pixels']} pixels, {fit['frames']} frames)")
    print(f"temperature fit (reference) {fit['temperature_fit']:.4f}; mask threshold {cal.mask_threshold:.4f}")
    print(f"bundle: {path}")
    return 0


CALIBRATE_HELP = """\
Fits how a bundle turns logits into probabilities, and its misclassification-mask threshold, on a
labelled split, and writes a NEW bundle (the input bundle is left untouched).

Methods:
  none         probabilities as the network gives them (softmax of the logits).
  temperature  one temperature T for all pixels: softmax(logits / T), T minimising the NLL of
               the split (Guo et al. 2017). Fitted and reported with every method.
  selective    selective scaling (Wang et al., CVPR 2023) on top of temperature scaling: a small
               MLP on the log-softmax of each pixel (K -> hidden -> hidden -> 1) learns to flag
               likely mispredictions (weighted BCE: --selector-weighting balanced weighs them
               n_correct / n_wrong, duplicate weighs them 2 as the authors duplicate them);
               flagged pixels' logits are divided by their own temperature T_sel in [1, 100],
               the others by T. The selector is fitted on the first frames of the split (in
               name order); the last --selector-val-fraction of them choose its training step
               (of 10 checkpoints) and T_sel, as the pair of least NLL there. The selector's
               weights are stored in the bundle's model.safetensors.
No method changes the predicted labels; all change the confidences and so the max_softmax and
entropy uncertainties, so the mask threshold is fitted after calibration: by max F0.5 (the
gamma-SSL definitions, default) or to a target false-positive rate (--mask-target-fpr 0.05: at
most 5% of correctly classified pixels flagged, as many errors caught as that allows).

The split MUST be held out from training (e.g. the validation split): on training frames the
model is over-confident and the fitted temperatures would not hold on new data. The fit uses a
seeded sample of at most --pixels-per-frame valid pixels per frame, held in memory:
frames x pixels x (4 x classes + 16) bytes (e.g. 101 frames x 20000 x 11 classes: ~121 MB).
NLL is that sample's; ECE (15 bins) is the evaluator's, on the whole frames of the split.

Example: uncertain-seg calibrate --bundle runs/vits14/bundle --data ../shared/data/camvid/day/val \\
    --out runs/vits14/bundle_calibrated --method selective
"""


def add_options(p: argparse.ArgumentParser) -> None:
    """The ``uncertain-seg calibrate`` command's description and options."""
    p.description = CALIBRATE_HELP
    p.add_argument("--bundle", required=True, help="input model bundle folder, or the name of a shipped bundle")
    p.add_argument("--data", required=True, help="held-out labelled folder (images/ + labels/), not used for training")
    p.add_argument("--out", required=True, help="folder of the calibrated bundle (written atomically; not the input)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--method", choices=CALIBRATION_METHODS, default="selective", help="calibration method (default: selective)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--mask-threshold", choices=("f05",), default="f05",
                       help="mask threshold rule: f05 = the threshold of max F0.5 (default)")
    group.add_argument("--mask-target-fpr", type=float, default=None, metavar="X",
                       help="instead: the threshold flagging at most a fraction X of correctly classified pixels (e.g. 0.05)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--pixels-per-frame", type=int, default=20000, help="valid pixels sampled per frame (default: 20000)")
    p.add_argument("--selector-steps", type=int, default=1000, help="Adam steps of the selector, batches of 8192 pixels (default: 1000)")
    p.add_argument("--selector-hidden", type=int, default=64, help="hidden width of the selector MLP (default: 64)")
    p.add_argument("--selector-weighting", choices=SELECTOR_WEIGHTINGS, default="balanced",
                   help="BCE weight of misclassified pixels: balanced (n_correct / n_wrong) or duplicate (2, the authors') (default: balanced)")
    p.add_argument("--selector-val-fraction", type=float, default=0.3,
                   help="last fraction of the split's frames that choose the selector's step and T_sel, not fitted on (0: none; default: 0.3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pixel sample and the selector (default: 0)")
    p.set_defaults(func=_run)
