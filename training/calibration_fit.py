"""Fitting calibration on sampled pixels of a held-out labelled split: the maths behind ``calibrate``.

:func:`collect_pixels` streams the split through the model once, keeping a seeded random sample of
at most ``pixels_per_frame`` valid pixels per frame: uncalibrated logits at label resolution
(float32), labels (int64), predicted losses (float32) and the frame each came from, on the CPU.
Memory is ``frames x pixels_per_frame x (4 K + 16)`` bytes (101 frames x 20k pixels x 11 classes:
~121 MB), plus transient chunks of at most 2^18 pixels while scoring. On that sample:

1. **Temperature** (always, as the reference and as the base of selective scaling): ``T`` in
   [0.05, 20] minimising the NLL of ``softmax(z / T)``, by ``torch.optim.LBFGS`` (strong-Wolfe line
   search) on ``log T``; the NLL is convex in ``1 / T``, so unimodal in ``log T``, and the bounded
   minimiser is the unbounded one clamped. Value and gradient are summed chunk by chunk
   (``d NLL / d log T = -mean(E_p[z] - z_y) / T``), so memory does not grow with the sample.
2. **Selective scaling** (Wang et al., CVPR 2023): the selector MLP on the log-softmax learns
   "this pixel is misclassified" by weighted BCE, Adam with cosine decay; ``weighting`` is
   ``balanced`` (the project's: misclassified pixels weigh ``n_correct / n_wrong``) or
   ``duplicate`` (the authors': every misclassified pixel duplicated once, weight 2). Flagged
   pixels get their own temperature ``T_sel`` in [1, 100], the others keep ``T``. As the authors
   keep a validation split, the selector is fitted on the first frames of the split and the last
   ``val_frames`` choose its training step (checkpoints every ``steps / 10``) and ``T_sel``: the
   pair minimising the NLL of the calibrated selection frames. Without selection frames both are
   fitted on the whole sample (the last step).
3. **Mask threshold** on the *calibrated* uncertainty of the bundle's source: the max-F0.5
   threshold (gamma-SSL definitions) or the smallest threshold whose false-positive rate (the
   fraction of correctly classified pixels flagged) is at most a target.

The split must be held out from training: on training frames the model is over-confident and the
fitted temperatures would be wrong for new data. ECE is not computed here: ``calibrate`` reports the
evaluator's, on the whole frames.
"""
import copy
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from uncertain_seg_ros.bundle import BundleConfig
from uncertain_seg_ros.calibration import CALIBRATION_METHODS, Calibration, SelectiveScaler
from uncertain_seg_ros.metrics import MisclassificationCurves
from uncertain_seg_ros.model import UncertainSegmenter
from uncertain_seg_ros.prediction import upsample
from uncertain_seg_ros.preprocessing import to_input
from uncertain_seg_ros.uncertainty import uncertainty

from .datasets import LabelledFolder

log = logging.getLogger(__name__)

TEMPERATURE_BOUNDS = (0.05, 20.0)
SELECTIVE_TEMPERATURE_BOUNDS = (1.0, 100.0)
SELECTOR_WEIGHTINGS = ("balanced", "duplicate")
CHUNK = 1 << 18  # pixels per chunk when scoring the whole sample


@dataclass
class PixelSample:
    """Sampled valid pixels of a labelled split: uncalibrated logits (N, K), labels (N,), predicted
    loss (N,), and ``frame`` (N,), the position in the split of the frame each pixel came from."""

    logits: torch.Tensor
    labels: torch.Tensor
    predicted_loss: torch.Tensor
    frame: torch.Tensor
    frames: int

    @property
    def errors(self) -> torch.Tensor:
        """(N,) bool: the model's argmax is wrong (calibration never changes the argmax)."""
        return self.logits.argmax(dim=1) != self.labels

    def split(self, first: int) -> tuple["PixelSample", "PixelSample"]:
        """(pixels of frames [0, first), pixels of the later frames)."""
        early = self.frame < first
        part = lambda keep, n: PixelSample(self.logits[keep], self.labels[keep], self.predicted_loss[keep], self.frame[keep], n)
        return part(early, first), part(~early, self.frames - first)


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
    logits_parts, label_parts, loss_parts, frame_parts = [], [], [], []
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
        frame_parts.append(torch.full((len(idx),), i, dtype=torch.int32))
    model.train(was_training)
    if not logits_parts:
        raise ValueError(f"{folder.root} has no labelled (valid) pixels to calibrate on")
    return PixelSample(torch.cat(logits_parts), torch.cat(label_parts), torch.cat(loss_parts), torch.cat(frame_parts), len(folder))


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / temperature)`` (N, K)."""
    if len(labels) == 0:
        return math.nan
    total = 0.0
    for start in range(0, len(labels), CHUNK):
        z = logits[start : start + CHUNK].double() / temperature
        total += float(F.cross_entropy(z, labels[start : start + CHUNK], reduction="sum"))
    return total / len(labels)


def _nll_and_slope(logits: torch.Tensor, labels: torch.Tensor, log_t: float) -> tuple[float, float]:
    """NLL at ``T = exp(log_t)`` and its derivative in ``log_t``, summed chunk by chunk."""
    beta = math.exp(-log_t)
    total, slope = 0.0, 0.0
    for start in range(0, len(labels), CHUNK):
        z = logits[start : start + CHUNK].double()
        y = labels[start : start + CHUNK]
        log_p = F.log_softmax(z * beta, dim=1)
        total -= float(log_p.gather(1, y[:, None]).sum())
        slope += float((log_p.exp() * z).sum() - z.gather(1, y[:, None]).sum())  # d NLL / d beta, summed
    return total / len(labels), -beta * slope / len(labels)


def _minimise_over_temperature(logits: torch.Tensor, labels: torch.Tensor, bounds: tuple[float, float]) -> float:
    """The temperature in ``bounds`` of least NLL: LBFGS on log T from T = 1, then clamped."""
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, tolerance_grad=1e-10, tolerance_change=1e-12,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        value, slope = _nll_and_slope(logits, labels, float(log_t.detach().clamp(-30.0, 30.0)))
        log_t.grad = torch.tensor([slope], dtype=torch.float64)
        return torch.tensor(value, dtype=torch.float64)

    optimizer.step(closure)
    return float(min(max(math.exp(min(float(log_t.detach()), 30.0)), bounds[0]), bounds[1]))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The temperature in ``bounds`` minimising the NLL of ``softmax(logits / T)``; logits (N, K), labels (N,)."""
    if len(labels) == 0:
        raise ValueError("no pixels to fit a temperature on")
    return _minimise_over_temperature(logits, labels, bounds)


@torch.no_grad()
def selector_scores(selector: SelectiveScaler, logits: torch.Tensor) -> torch.Tensor:
    """Selector logits (N,) for sampled pixel logits (N, K), scored in chunks on the selector's device."""
    device = next(selector.parameters()).device
    parts = [selector.forward_rows(logits[s : s + CHUNK].to(device)).cpu() for s in range(0, len(logits), CHUNK)]
    return torch.cat(parts) if parts else torch.zeros(0)


def misprediction_weight(errors: torch.Tensor, weighting: str) -> float:
    """BCE weight of a misclassified pixel: ``n_correct / n_wrong`` (balanced) or 2 (duplicate, the authors')."""
    if weighting == "balanced":
        return float((~errors).sum()) / max(1, int(errors.sum()))
    if weighting == "duplicate":
        return 2.0
    raise ValueError(f"selector weighting must be one of {SELECTOR_WEIGHTINGS}, got {weighting!r}")


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
    weighting: str = "balanced",
    checkpoints: int = 0,
) -> SelectiveScaler | list[tuple[int, SelectiveScaler]]:
    """Train the selective-scaling selector to predict misclassified pixels (weighted BCE).

    ``logits`` (N, K) are uncalibrated; the target is ``argmax != label``, a misclassified pixel
    weighing :func:`misprediction_weight`. Returns the trained selector, or with ``checkpoints`` > 0
    ``(step, copy)`` at that many evenly spaced steps (the last one included), to choose from.
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
    pos_weight = torch.tensor(misprediction_weight(errors.bool(), weighting), device=device)
    optimizer = torch.optim.Adam(selector.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps))
    gen = torch.Generator().manual_seed(seed)
    marks = set(np.linspace(steps / max(1, checkpoints), steps, checkpoints).round().astype(int).tolist()) if checkpoints else set()
    saved = []
    bar = tqdm(range(1, steps + 1), desc="selector", disable=not progress, unit="step")
    for step in bar:
        idx = torch.randint(n, (min(batch_size, n),), generator=gen)
        z, y = logits[idx].to(device), errors[idx].to(device)
        loss = F.binary_cross_entropy_with_logits(selector.forward_rows(z), y, pos_weight=pos_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(bce=f"{loss.item():.4f}", refresh=False)
        if step in marks:
            saved.append((step, copy.deepcopy(selector).eval()))
    return saved if checkpoints else selector.eval()


def fit_selective_temperature(
    logits: torch.Tensor, labels: torch.Tensor, flagged: torch.Tensor, bounds: tuple[float, float] = SELECTIVE_TEMPERATURE_BOUNDS
) -> float:
    """``T_sel`` in ``bounds`` minimising the NLL of the flagged pixels; 1 if none is flagged."""
    if not bool(flagged.any()):
        log.warning("the selector flags no pixel of the split; its pixels keep the temperature of the others")
        return 1.0
    return _minimise_over_temperature(logits[flagged], labels[flagged], bounds)


def selective_logits(logits: torch.Tensor, flagged: torch.Tensor, selective_temperature: float, temperature: float = 1.0) -> torch.Tensor:
    """What :meth:`Calibration.apply` does for "selective", on sampled pixel rows (N, K)."""
    return torch.where(flagged[:, None], logits / selective_temperature, logits / temperature)


@dataclass(frozen=True)
class SelectorOptions:
    """How the selective-scaling selector is fitted (see the module docstring)."""

    val_frames: int = 0
    weighting: str = "balanced"
    hidden: int = 64
    steps: int = 1000
    seed: int = 0


@dataclass
class SelectiveFit:
    """A fitted selector, its ``T_sel`` and how they were chosen."""

    selector: SelectiveScaler
    selective_temperature: float
    info: dict


def fit_selective(sample: PixelSample, temperature: float, options: SelectorOptions = SelectorOptions(),
                  device: torch.device | str = "cpu", progress: bool = True) -> SelectiveFit:
    """Selective scaling on top of temperature ``temperature``; the selector fitted on the frames before
    the last ``options.val_frames``, which choose the step and ``T_sel`` (see the module docstring)."""
    val_frames, weighting, hidden, steps, seed = options.val_frames, options.weighting, options.hidden, options.steps, options.seed
    if not 0 <= val_frames < sample.frames:
        raise ValueError(f"selection frames must be in [0, {sample.frames}) for {sample.frames} frames, got {val_frames}")
    fit_part, select_part = sample.split(sample.frames - val_frames) if val_frames else (sample, sample)
    if len(select_part.labels) == 0:
        raise ValueError("the selection frames have no labelled pixels")
    candidates = train_selector(fit_part.logits, fit_part.labels, hidden, steps, seed=seed, device=device, progress=progress,
                                weighting=weighting, checkpoints=10 if val_frames else 1)
    best = None
    for step, selector in candidates:
        flagged = selector_scores(selector, select_part.logits) > 0
        t_sel = fit_selective_temperature(select_part.logits, select_part.labels, flagged)
        value = nll(selective_logits(select_part.logits, flagged, t_sel, temperature), select_part.labels)
        if best is None or value < best[0]:
            best = (value, step, selector, t_sel)
    value, step, selector, t_sel = best
    scores = selector_scores(selector, sample.logits)
    errors = sample.errors
    curves = MisclassificationCurves()
    curves.update(torch.sigmoid(scores), errors)
    flagged = scores > 0
    info = {
        "hidden": hidden, "steps": steps, "chosen_step": step, "weighting": weighting,
        "misprediction_weight": misprediction_weight(fit_part.errors, weighting),
        "fit_frames": fit_part.frames, "selection_frames": val_frames, "selection_nll": value,
        "flagged_fraction": float(flagged.float().mean()), "error_auroc": curves.auroc(),
        "flagged_error_rate": float(errors[flagged].float().mean()) if bool(flagged.any()) else 0.0,
        "selective_temperature_bounds": list(SELECTIVE_TEMPERATURE_BOUNDS),
    }
    return SelectiveFit(selector, t_sel, info)


def fit_calibration(sample: PixelSample, method: str, options: SelectorOptions = SelectorOptions(),
                    device: torch.device | str = "cpu", progress: bool = True) -> tuple[Calibration, SelectiveScaler | None]:
    """Fit ``method`` ("none", "temperature", "selective") on the sample; ``Calibration.fit`` records
    the NLL before and after, the reference temperature and, for "selective", how the selector was chosen."""
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"method must be one of {CALIBRATION_METHODS}, got {method!r}")
    z, y, errors = sample.logits, sample.labels, sample.errors
    temperature = fit_temperature(z, y)
    fit: dict = {"frames": sample.frames, "pixels": len(y), "error_rate": float(errors.float().mean()), "nll_before": nll(z, y),
                 "temperature_fit": temperature, "nll_temperature": nll(z, y, temperature)}
    selector = None
    if method == "selective":
        sel = fit_selective(sample, temperature, options, device, progress)
        selector, fit["selective"] = sel.selector, sel.info
        calibration = Calibration(method="selective", temperature=temperature, selective_temperature=sel.selective_temperature)
        calibrated = selective_logits(z, selector_scores(selector, z) > 0, sel.selective_temperature, temperature)
    elif method == "temperature":
        calibration, calibrated = Calibration(method="temperature", temperature=temperature), z / temperature
    else:
        calibration, calibrated = Calibration(method="none"), z
    fit["nll_after"] = nll(calibrated, y)
    return Calibration(calibration.temperature, calibration.method, calibration.selective_temperature, fit), selector


def calibrated_rows(calibration: Calibration, selector: SelectiveScaler | None, logits: torch.Tensor) -> torch.Tensor:
    """``calibration`` applied to pixel rows (N, K), as :meth:`Calibration.apply` does to maps."""
    if calibration.method == "selective":
        flagged = selector_scores(selector, logits) > 0
        return selective_logits(logits, flagged, calibration.selective_temperature, calibration.temperature)
    return logits / calibration.temperature if calibration.method == "temperature" else logits


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


def sample_uncertainty(source: str, logits: torch.Tensor, predicted_loss: torch.Tensor) -> torch.Tensor:
    """The bundle's uncertainty (N,) of sampled pixels from calibrated logits (N, K)."""
    parts = [uncertainty(source, logits[s : s + CHUNK].softmax(dim=1), predicted_loss[s : s + CHUNK])
             for s in range(0, len(logits), CHUNK)]
    return torch.cat(parts)
