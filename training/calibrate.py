"""Fit a bundle's calibration and mask threshold on a held-out labelled split; write a new bundle.

``uncertain-seg calibrate`` streams the labelled folder through the bundle's model once, keeping a
seeded random sample of at most ``pixels_per_frame`` valid pixels per frame: their uncalibrated
logits at label resolution (float32), labels (int64) and predicted losses (float32), on the CPU.
Memory is ``frames x pixels_per_frame x (4 K + 12)`` bytes (101 frames x 20k pixels x 11 classes:
~113 MB), plus transient chunks of at most 2^18 pixels while scoring.
Everything is fitted on that sample:

1. **Temperature** (always, as the reference): ``T`` in [0.05, 20] minimising the NLL of
   ``softmax(z / T)``, by golden-section search on ``log T`` (the NLL is convex in ``1 / T``, so
   unimodal in ``log T``).
2. **Selective scaling** (``method="selective"``; Wang et al., CVPR 2023): the selector MLP on the
   log-softmax learns "this pixel is misclassified" by class-balanced BCE (``pos_weight =
   n_correct / n_wrong``), Adam with cosine decay. Then ``T_sel`` in [1, 100], the temperature
   of the flagged pixels, minimises their NLL (same search). The paper fixes ``T_sel`` to a large
   value; fitting it costs nothing and cannot do worse on the split than any fixed value in the
   range. Both are fitted on the same sample: the selector is small (a few thousand weights
   against ~10^6 pixels), so its flags on the split are close to those on new data.
3. **Mask threshold** on the *calibrated* uncertainty of the bundle's source: the max-F0.5
   threshold (gamma-SSL definitions) or the smallest threshold whose false-positive rate (the
   fraction of correctly classified pixels flagged) is at most a target.

The split must be held out from training: on training frames the model is over-confident and the
fitted temperatures would be wrong for new data.
"""
import argparse
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from uncertain_seg_ros import __version__
from uncertain_seg_ros.bundle import BundleConfig, load_bundle, save_bundle
from uncertain_seg_ros.calibration import CALIBRATION_METHODS, Calibration, SelectiveScaler
from uncertain_seg_ros.metrics import CalibrationBins, MisclassificationCurves
from uncertain_seg_ros.model import UncertainSegmenter
from uncertain_seg_ros.prediction import upsample
from uncertain_seg_ros.preprocessing import to_input
from uncertain_seg_ros.resources import resolve_bundle
from uncertain_seg_ros.uncertainty import uncertainty

from .datasets import LabelledFolder
from .distributed import resolve_device
from .output_folders import refuse_existing

log = logging.getLogger(__name__)

TEMPERATURE_BOUNDS = (0.05, 20.0)
SELECTIVE_TEMPERATURE_BOUNDS = (1.0, 100.0)
ECE_BINS = 15
CHUNK = 1 << 18  # pixels per chunk when scoring the whole sample


@dataclass
class PixelSample:
    """Sampled valid pixels of a labelled split: uncalibrated logits (N, K), labels (N,), predicted loss (N,)."""

    logits: torch.Tensor
    labels: torch.Tensor
    predicted_loss: torch.Tensor
    frames: int

    @property
    def errors(self) -> torch.Tensor:
        """(N,) bool: the model's argmax is wrong (calibration never changes the argmax)."""
        return self.logits.argmax(dim=1) != self.labels


@torch.no_grad()
def collect_pixels(
    model: UncertainSegmenter,
    config: BundleConfig,
    folder: LabelledFolder,
    device: torch.device,
    pixels_per_frame: int = 20000,
    seed: int = 0,
    progress: bool = True,
) -> PixelSample:
    """Run the model on every frame and keep up to ``pixels_per_frame`` valid pixels per frame.

    Frame ``i``'s pixels are drawn without replacement by ``numpy.random.default_rng([seed, i])``,
    so the sample does not depend on the order in which frames are read.
    """
    if pixels_per_frame <= 0:
        raise ValueError(f"pixels_per_frame must be positive, got {pixels_per_frame}")
    was_training = model.training
    model.eval()
    k = config.model.num_classes
    size = (config.input.height, config.input.width)
    logits_parts, label_parts, loss_parts = [], [], []
    for i in tqdm(range(len(folder)), desc=f"calibration pixels {folder.root.name}", disable=not progress, unit="frame"):
        image, label = folder.read(i)
        target = torch.from_numpy(label).reshape(-1)
        valid = (target >= 0) & (target < k)
        if config.ignore_index is not None:
            valid &= target != config.ignore_index
        idx = valid.nonzero()[:, 0]
        if len(idx) > pixels_per_frame:
            keep = np.sort(np.random.default_rng([seed, i]).choice(len(idx), pixels_per_frame, replace=False))
            idx = idx[torch.from_numpy(keep)]
        if len(idx) == 0:
            continue
        x = to_input(torch.from_numpy(image).unsqueeze(0).to(device), size, config.input.mean, config.input.std)
        logits, loss = model(x)
        idx_dev = idx.to(device)
        logits_parts.append(upsample(logits.float(), label.shape)[0].flatten(1)[:, idx_dev].T.cpu())
        loss_parts.append(upsample(loss.float(), label.shape)[0, 0].flatten()[idx_dev].cpu())
        label_parts.append(target[idx])
    model.train(was_training)
    if not logits_parts:
        raise ValueError(f"{folder.root} has no labelled (valid) pixels to calibrate on")
    return PixelSample(torch.cat(logits_parts), torch.cat(label_parts), torch.cat(loss_parts), len(folder))


def golden_section(f: Callable[[float], float], lo: float, hi: float, tol: float = 1e-5) -> float:
    """Minimiser of a unimodal ``f`` on [lo, hi] by golden-section search, to ``tol`` in x."""
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - inv_phi * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + inv_phi * (b - a)
            fd = f(d)
    return (a + b) / 2.0


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / temperature)`` (N, K)."""
    if len(labels) == 0:
        return math.nan
    total = 0.0
    for start in range(0, len(labels), CHUNK):
        z = logits[start : start + CHUNK].double() / temperature
        total += float(F.cross_entropy(z, labels[start : start + CHUNK], reduction="sum"))
    return total / len(labels)


def ece(logits: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error of max-softmax confidence (equal-width ``bins``), as the evaluator reports."""
    acc = CalibrationBins(bins)
    for start in range(0, len(labels), CHUNK):
        conf, pred = logits[start : start + CHUNK].softmax(dim=1).max(dim=1)
        acc.update(conf, pred == labels[start : start + CHUNK])
    return acc.ece()


def _minimise_over_temperature(logits: torch.Tensor, labels: torch.Tensor, bounds: tuple[float, float]) -> float:
    log_t = golden_section(lambda s: nll(logits, labels, math.exp(s)), math.log(bounds[0]), math.log(bounds[1]))
    return math.exp(log_t)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The temperature in ``bounds`` minimising the NLL of ``softmax(logits / T)``; logits (N, K), labels (N,)."""
    return _minimise_over_temperature(logits, labels, bounds)


@torch.no_grad()
def selector_scores(selector: SelectiveScaler, logits: torch.Tensor) -> torch.Tensor:
    """Selector logits (N,) for sampled pixel logits (N, K), scored in chunks on the selector's device."""
    device = next(selector.parameters()).device
    parts = [selector.forward_rows(logits[s : s + CHUNK].to(device)).cpu() for s in range(0, len(logits), CHUNK)]
    return torch.cat(parts) if parts else torch.zeros(0)


def train_selector(
    logits: torch.Tensor,
    labels: torch.Tensor,
    hidden: int = 64,
    steps: int = 1000,
    batch_size: int = 8192,
    lr: float = 1e-3,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> SelectiveScaler:
    """Train the selective-scaling selector to predict misclassified pixels (class-balanced BCE).

    ``logits`` (N, K) are uncalibrated; the target is ``argmax != label``, weighted by
    ``pos_weight = n_correct / n_wrong`` so that the rare mispredictions weigh as much as the rest.
    """
    errors = (logits.argmax(dim=1) != labels).float()
    n_wrong, n = float(errors.sum()), len(errors)
    if n_wrong == 0 or n_wrong == n:
        raise ValueError(
            f"the calibration split has {int(n_wrong)} misclassified pixels of {n}: the selector needs both "
            "correct and misclassified pixels (use --method temperature)"
        )
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        selector = SelectiveScaler(logits.shape[1], hidden)
    selector.to(device).train()
    pos_weight = torch.tensor((n - n_wrong) / n_wrong, device=device)
    optimizer = torch.optim.Adam(selector.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps))
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="selector", disable=not progress, unit="step")
    for _ in bar:
        idx = torch.randint(n, (min(batch_size, n),), generator=gen)
        z, y = logits[idx].to(device), errors[idx].to(device)
        out = selector.forward_rows(z)
        loss = F.binary_cross_entropy_with_logits(out, y, pos_weight=pos_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(bce=f"{loss.item():.4f}", refresh=False)
    return selector.eval()


def fit_selective_temperature(
    logits: torch.Tensor, labels: torch.Tensor, flagged: torch.Tensor, bounds: tuple[float, float] = SELECTIVE_TEMPERATURE_BOUNDS
) -> float:
    """``T_sel`` in ``bounds`` minimising the NLL of the flagged pixels (the others keep T = 1); 1 if none is flagged."""
    if not bool(flagged.any()):
        log.warning("the selector flags no pixel of the split; selective scaling leaves every pixel as it is")
        return 1.0
    return _minimise_over_temperature(logits[flagged], labels[flagged], bounds)


def selective_logits(logits: torch.Tensor, flagged: torch.Tensor, selective_temperature: float) -> torch.Tensor:
    """What :meth:`Calibration.apply` does for "selective", on sampled pixel rows (N, K)."""
    return torch.where(flagged[:, None], logits / selective_temperature, logits)


def fit_mask_threshold(u: torch.Tensor, error: torch.Tensor, rule: str | float = "f05") -> float:
    """Misclassification-mask threshold (mask = ``u > t``) from uncertainties ``u`` and errors on the split.

    ``rule="f05"``: the max-F0.5 threshold of :meth:`MisclassificationCurves.max_f05` (gamma-SSL
    definitions, 10^4 bins). A float in (0, 1): a target false-positive rate; the smallest ``t``
    such that the fraction of *correct* pixels with ``u > t`` is at most the target, i.e. the
    threshold that flags the most pixels within that false-alarm budget.
    """
    u, error = u.reshape(-1).float(), error.reshape(-1).bool()
    if rule == "f05":
        curves = MisclassificationCurves()
        curves.update(u, error)
        threshold = curves.max_f05()[1]
        if math.isnan(threshold):
            raise ValueError("no pixels to fit the mask threshold on")
        return float(threshold)
    if isinstance(rule, str) or not 0.0 < float(rule) < 1.0:
        raise ValueError(f"mask threshold rule must be 'f05' or a target false-positive rate in (0, 1), got {rule!r}")
    correct = u[~error]
    n = len(correct)
    allowed = math.floor(float(rule) * n)
    if n == 0 or allowed >= n:
        return 0.0
    # At most `allowed` correct pixels lie strictly above the (n - allowed)-th smallest value.
    t = float(torch.kthvalue(correct, n - allowed).values)
    return min(max(t, 0.0), 1.0)


def _fpr_recall(u: torch.Tensor, error: torch.Tensor, t: float) -> tuple[float, float]:
    flagged = u > t
    correct = ~error
    fpr = float((flagged & correct).sum()) / max(1, int(correct.sum()))
    recall = float((flagged & error).sum()) / max(1, int(error.sum()))
    return fpr, recall


def _uncertainty(source: str, logits: torch.Tensor, predicted_loss: torch.Tensor) -> torch.Tensor:
    """The bundle's uncertainty (N,) of sampled pixels from calibrated logits (N, K)."""
    parts = [uncertainty(source, logits[s : s + CHUNK].softmax(dim=1), predicted_loss[s : s + CHUNK])
             for s in range(0, len(logits), CHUNK)]
    return torch.cat(parts)


def _threshold_rule_text(rule: str | float) -> str:
    return "max F0.5 (gamma-SSL definitions)" if rule == "f05" else f"target false-positive rate {float(rule):g}"


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
) -> Path:
    """Fit calibration and mask threshold of a bundle on the labelled folder ``data``; write a new bundle to ``out``.

    ``method``: "none", "temperature" or "selective"; the temperature is fitted in every case and
    reported. ``threshold``: "f05" or a target false-positive rate in (0, 1). The input bundle is
    never modified; ``out`` is written atomically and must be another folder.
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

    sample = collect_pixels(bundle.model, cfg, folder, dev, pixels_per_frame, seed, progress)
    z, y, errors = sample.logits, sample.labels, sample.errors
    log.info("calibration sample: %d pixels from %d frames, error rate %.4f", len(y), sample.frames, float(errors.float().mean()))
    fit: dict = {
        "data": str(data), "frames": sample.frames, "pixels": len(y), "pixels_per_frame": pixels_per_frame,
        "seed": seed, "error_rate": float(errors.float().mean()), "ece_bins": ECE_BINS,
        "nll_before": nll(z, y), "ece_before": ece(z, y),
    }
    temperature = fit_temperature(z, y)
    fit.update(temperature_fit=temperature, nll_temperature=nll(z, y, temperature), ece_temperature=ece(z / temperature, y))
    log.info("temperature %.4f: NLL %.4f -> %.4f, ECE %.4f -> %.4f", temperature, fit["nll_before"],
             fit["nll_temperature"], fit["ece_before"], fit["ece_temperature"])

    selector = None
    if method == "selective":
        selector = train_selector(z, y, selector_hidden, steps, seed=seed, device=dev, progress=progress)
        scores = selector_scores(selector, z)
        flagged = scores > 0
        t_sel = fit_selective_temperature(z, y, flagged)
        calibrated = selective_logits(z, flagged, t_sel)
        curves = MisclassificationCurves()
        curves.update(torch.sigmoid(scores), errors)
        fit["selective"] = {
            "hidden": selector_hidden, "steps": steps, "pos_weight": float((~errors).sum() / errors.sum()),
            "flagged_fraction": float(flagged.float().mean()), "error_auroc": curves.auroc(),
            "flagged_error_rate": float(errors[flagged].float().mean()) if bool(flagged.any()) else 0.0,
            "selective_temperature_bounds": list(SELECTIVE_TEMPERATURE_BOUNDS),
        }
        calibration_values = {"selective_temperature": t_sel}
        log.info("selector flags %.2f%% of pixels (error AUROC %.4f); T_sel %.3f",
                 100 * fit["selective"]["flagged_fraction"], fit["selective"]["error_auroc"], t_sel)
    elif method == "temperature":
        calibrated = z / temperature
        calibration_values = {"temperature": temperature}
    else:
        calibrated = z
        calibration_values = {}
    fit.update(nll_after=nll(calibrated, y), ece_after=ece(calibrated, y))
    log.info("%s calibration: NLL %.4f -> %.4f, ECE %.4f -> %.4f", method, fit["nll_before"], fit["nll_after"],
             fit["ece_before"], fit["ece_after"])
    calibration = Calibration(method=method, fit=fit, **calibration_values)

    u = _uncertainty(cfg.uncertainty_source, calibrated, sample.predicted_loss)
    mask_threshold = fit_mask_threshold(u, errors, threshold)
    fpr, recall = _fpr_recall(u, errors, mask_threshold)
    log.info("mask threshold %.4f on %s uncertainty (%s): FPR %.4f, recall of errors %.4f",
             mask_threshold, cfg.uncertainty_source, _threshold_rule_text(threshold), fpr, recall)

    model = bundle.model
    model.set_selector(selector)
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
                     args.selector_steps, args.seed, args.selector_hidden)
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
  selective    selective scaling (Wang et al., CVPR 2023): a small MLP on the log-softmax of
               each pixel (K -> hidden -> hidden -> 1) learns to flag likely mispredictions
               (class-balanced BCE); flagged pixels' logits are divided by a large temperature
               T_sel (fitted on the split in [1, 100]), the others are left as they are. The
               selector's weights are stored in the bundle's model.safetensors.
No method changes the predicted labels; all change the confidences and so the max_softmax and
entropy uncertainties, so the mask threshold is fitted after calibration: by max F0.5 (the
gamma-SSL definitions, default) or to a target false-positive rate (--mask-target-fpr 0.05: at
most 5% of correctly classified pixels flagged, as many errors caught as that allows).

The split MUST be held out from training (e.g. the validation split): on training frames the
model is over-confident and the fitted temperatures would not hold on new data. The fit uses a
seeded sample of at most --pixels-per-frame valid pixels per frame, held in memory:
frames x pixels x (4 x classes + 12) bytes (e.g. 101 frames x 20000 x 11 classes: ~113 MB).

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
    p.add_argument("--seed", type=int, default=0, help="seed of the pixel sample and the selector (default: 0)")
    p.set_defaults(func=_run)
