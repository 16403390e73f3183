"""Streaming segmentation and uncertainty metrics in constant memory.

Evaluating on thousands of full-resolution frames cannot keep every pixel, so each metric keeps
only histograms: a K x K confusion matrix, per-bin counts of misclassified / correct pixels by
uncertainty, and per-bin calibration sums. ``update`` takes tensors of any shape on any device and
accumulates there (counts as int64, sums as float64); results come back as Python floats and
numpy arrays. ``state()`` / ``load_state()`` expose the accumulators so that distributed
evaluation can ``torch.distributed.all_reduce`` (SUM) them, and ``merge`` adds another instance.

Misclassification detection follows the Masked gamma-SSL protocol: the uncertainty ``u`` in [0, 1]
is a score where higher means "more likely misclassified". Ranking metrics (AUROC, AUPR, FPR at a
TPR) treat misclassified pixels as positives and use the histogram bins as the distinct scores, so
values within one bin count as tied, exactly as scikit-learn treats tied scores.
"""
import math

import numpy as np
import torch

ECE_BINS = 15  # equal-width confidence bins of every ECE the project reports


class _Accumulator:
    """Shared state handling: a list of tensors that live on the device of the latest update.

    They start on the constructor's ``device``; give every rank of a distributed evaluation the
    same device so that a rank that saw no data can still take part in the all-reduce.
    """

    _tensors: list[torch.Tensor]

    def _to_device(self, device: torch.device) -> None:
        if self._tensors[0].device != device:
            self._tensors = [t.to(device) for t in self._tensors]

    def to(self, device: torch.device | str) -> "_Accumulator":
        """Move the accumulators to ``device`` (e.g. before an all-reduce over NCCL); returns self."""
        self._to_device(torch.device(device))
        return self

    def state(self) -> list[torch.Tensor]:
        """The accumulators themselves (not copies): all-reduce them in place with SUM."""
        return self._tensors

    def load_state(self, tensors: list[torch.Tensor]) -> None:
        """Replace the accumulators with ``tensors`` (same shapes and dtypes as ``state()``)."""
        if len(tensors) != len(self._tensors):
            raise ValueError(f"expected {len(self._tensors)} tensors, got {len(tensors)}")
        loaded = []
        for mine, theirs in zip(self._tensors, tensors):
            if theirs.shape != mine.shape:
                raise ValueError(f"state shape {tuple(theirs.shape)} does not match {tuple(mine.shape)}")
            loaded.append(theirs.detach().to(dtype=mine.dtype).clone())
        self._tensors = loaded

    def merge(self, other: "_Accumulator") -> None:
        """Add the counts of another accumulator of the same kind and size into this one."""
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        if [t.shape for t in other._tensors] != [t.shape for t in self._tensors]:
            raise ValueError("cannot merge accumulators of different sizes")
        device = self._tensors[0].device
        self._tensors = [mine + theirs.to(device) for mine, theirs in zip(self._tensors, other._tensors)]

    def reset(self) -> None:
        """Zero all accumulators."""
        self._tensors = [torch.zeros_like(t) for t in self._tensors]


def _bin_index(values: torch.Tensor, bins: int) -> torch.Tensor:
    """``min(floor(clamp(v, 0, 1) * bins), bins - 1)`` in float64; NaN counts as 1 (most uncertain)."""
    v = torch.nan_to_num(values.detach().reshape(-1).to(torch.float64), nan=1.0).clamp(0.0, 1.0)
    return torch.floor(v * bins).long().clamp_max(bins - 1)


def _valid_mask(valid: torch.Tensor | None, numel: int, device: torch.device) -> torch.Tensor | None:
    if valid is None:
        return None
    valid = valid.reshape(-1).to(device=device, dtype=torch.bool)
    if valid.numel() != numel:
        raise ValueError(f"valid has {valid.numel()} elements, expected {numel}")
    return valid


def _bool_flat(x: torch.Tensor, numel: int, name: str) -> torch.Tensor:
    flat = x.reshape(-1).to(torch.bool)
    if flat.numel() != numel:
        raise ValueError(f"{name} has {flat.numel()} elements, expected {numel}")
    return flat


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Elementwise ``num / den`` with NaN where ``den`` is 0."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


class ConfusionMatrix(_Accumulator):
    """K x K pixel confusion matrix (rows = target, columns = prediction) for IoU and accuracy."""

    def __init__(self, num_classes: int, ignore_index: int | None = None, device: torch.device | str = "cpu") -> None:
        if num_classes <= 0:
            raise ValueError("num_classes must be positive")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self._tensors = [torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)]

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Count pixels; those whose target is ``ignore_index`` or outside [0, K) are skipped.

        A prediction outside [0, K) on a counted pixel is a bug upstream and raises ``ValueError``.
        """
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        if pred.is_floating_point() or target.is_floating_point():
            raise TypeError("pred and target must be integer label tensors")
        k = self.num_classes
        t = target.detach().reshape(-1).long()
        p = pred.detach().reshape(-1).long().to(t.device)
        keep = (t >= 0) & (t < k)
        if self.ignore_index is not None:
            keep &= t != self.ignore_index
        t, p = t[keep], p[keep]
        if bool(((p < 0) | (p >= k)).any()):
            raise ValueError(f"prediction outside [0, {k}) on a labelled pixel")
        self._to_device(t.device)
        self._tensors[0] += torch.bincount(t * k + p, minlength=k * k)

    @property
    def matrix(self) -> np.ndarray:
        """The K x K int64 counts, rows = target class, columns = predicted class."""
        return self._tensors[0].cpu().numpy().reshape(self.num_classes, self.num_classes)

    def iou(self) -> np.ndarray:
        """Per-class intersection over union; NaN for a class absent from both target and prediction."""
        m = self.matrix
        inter = np.diag(m)
        union = m.sum(axis=0) + m.sum(axis=1) - inter
        return _ratio(inter, union)

    def miou(self) -> float:
        """Mean IoU over the classes that occur (NaN entries skipped); NaN if none occurs."""
        iou = self.iou()
        return float(np.mean(iou[~np.isnan(iou)])) if (~np.isnan(iou)).any() else math.nan

    def pixel_accuracy(self) -> float:
        """Fraction of counted pixels predicted correctly; NaN before any pixel."""
        m = self.matrix
        total = m.sum()
        return float(np.trace(m) / total) if total else math.nan

    def count(self) -> int:
        """Number of counted (labelled) pixels."""
        return int(self.matrix.sum())


class MisclassificationCurves(_Accumulator):
    """How well an uncertainty score in [0, 1] detects misclassified pixels, from two histograms.

    Values are clamped into [0, 1] and binned by ``min(floor(u * bins), bins - 1)``; NaN counts as
    maximally uncertain. Thresholds sit at the bin edges, so results are exact for scores that are
    distinct at bin resolution and within about one bin width otherwise.
    """

    def __init__(self, bins: int = 10000, device: torch.device | str = "cpu") -> None:
        if bins <= 0:
            raise ValueError("bins must be positive")
        self.bins = bins
        # errors[b] at index b, correct[b] at index bins + b
        self._tensors = [torch.zeros(2 * bins, dtype=torch.int64, device=device)]

    def update(self, uncertainty: torch.Tensor, error: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Count pixels by uncertainty bin; ``error`` True = misclassified; ``valid`` False = skipped."""
        idx = _bin_index(uncertainty, self.bins)
        err = _bool_flat(error, idx.numel(), "error").to(idx.device)
        keep = _valid_mask(valid, idx.numel(), idx.device)
        idx = idx + self.bins * (~err).long()
        if keep is not None:
            idx = idx[keep]
        self._to_device(idx.device)
        self._tensors[0] += torch.bincount(idx, minlength=2 * self.bins)

    def histograms(self) -> tuple[np.ndarray, np.ndarray]:
        """``(errors, correct)``: int64 pixel counts per uncertainty bin, lowest uncertainty first."""
        h = self._tensors[0].cpu().numpy()
        return h[: self.bins], h[self.bins :]

    def _descending(self) -> tuple[np.ndarray, np.ndarray]:
        """Cumulative (tp, fp) when flagging every bin from the most uncertain down to each non-empty bin."""
        errors, correct = self.histograms()
        nonempty = (errors + correct)[::-1] > 0
        tp = np.cumsum(errors[::-1])[nonempty]
        fp = np.cumsum(correct[::-1])[nonempty]
        return tp, fp

    def count(self) -> int:
        """Number of counted pixels."""
        return int(self._tensors[0].sum())

    def error_rate(self) -> float:
        """Fraction of counted pixels that are misclassified; NaN before any pixel."""
        errors, correct = self.histograms()
        total = errors.sum() + correct.sum()
        return float(errors.sum() / total) if total else math.nan

    def roc_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """``(fpr, tpr)`` from (0, 0) through one point per non-empty bin, most uncertain first.

        The same points as ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``.
        """
        tp, fp = self._descending()
        tpr = _ratio(np.concatenate([[0], tp]), tp[-1] if len(tp) else 0)
        fpr = _ratio(np.concatenate([[0], fp]), fp[-1] if len(fp) else 0)
        return fpr, tpr

    def auroc(self) -> float:
        """Area under the ROC curve (trapezoidal, ties within a bin as one threshold); NaN if one class is missing."""
        fpr, tpr = self.roc_curve()
        if len(fpr) < 2 or np.isnan(fpr).any() or np.isnan(tpr).any():
            return math.nan
        return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))

    def pr_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """``(precision, recall)`` of flagging misclassified pixels, as ``sklearn.metrics.precision_recall_curve``.

        Ordered by increasing threshold (recall decreasing), ending with the point (1, 0).
        """
        tp, fp = self._descending()
        if len(tp) == 0 or tp[-1] == 0:
            return np.array([1.0]), np.array([0.0])
        precision = _ratio(tp, tp + fp)
        recall = tp / tp[-1]
        return np.concatenate([precision[::-1], [1.0]]), np.concatenate([recall[::-1], [0.0]])

    def aupr(self) -> float:
        """Average precision ``sum_n (R_n - R_{n-1}) P_n`` as scikit-learn defines it; NaN without errors."""
        tp, fp = self._descending()
        if len(tp) == 0 or tp[-1] == 0:
            return math.nan
        precision = tp / (tp + fp)
        recall = tp / tp[-1]
        return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))

    def fpr_at_tpr(self, tpr: float = 0.95) -> float:
        """FPR at the first threshold, scanning from the most uncertain, where TPR reaches ``tpr``."""
        fpr_curve, tpr_curve = self.roc_curve()
        if np.isnan(fpr_curve).any() or np.isnan(tpr_curve).any():
            return math.nan
        reached = np.flatnonzero(tpr_curve >= tpr)
        return float(fpr_curve[reached[0]]) if len(reached) else math.nan

    def max_f05(self) -> tuple[float, float]:
        """``(max F0.5, threshold t)`` with the gamma-SSL definitions, over thresholds at the bin edges.

        A pixel is certain if ``u <= t`` (at bin resolution: every bin below the edge ``t``);
        TP = accurate & certain, FP = inaccurate & certain, FN = accurate & uncertain, and
        F0.5 = 1.25 P R / (0.25 P + R). Edges run from 1/bins up to 1 (everything certain); the
        smallest maximising ``t`` is returned. NaN, NaN before any pixel.
        """
        errors, correct = self.histograms()
        if errors.sum() + correct.sum() == 0:
            return math.nan, math.nan
        tp = np.cumsum(correct).astype(np.float64)  # certain = bins 0..b, edge t = (b + 1) / bins
        fp = np.cumsum(errors).astype(np.float64)
        fn = correct.sum() - tp
        # F_beta = (1 + b^2) TP / ((1 + b^2) TP + b^2 FN + FP), the same as 1.25 P R / (0.25 P + R).
        f05 = np.nan_to_num(_ratio(1.25 * tp, 1.25 * tp + 0.25 * fn + fp), nan=0.0)
        best = int(np.argmax(f05))
        return float(f05[best]), (best + 1) / self.bins

    def f05_floor(self) -> float:
        """F0.5 of flagging nothing (every pixel certain): ``1.25 a / (0.25 a + 1)`` at accuracy ``a``.

        :meth:`max_f05` is never below it, so an uncertainty is only useful by what it adds to it;
        the chance level of :meth:`aupr` is likewise the error rate.
        """
        a = 1.0 - self.error_rate()
        return 1.25 * a / (0.25 * a + 1.0)

    def to_dict(self) -> dict[str, float | int]:
        """Headline numbers: auroc, aupr, aupr_minus_error_rate, fpr95, max_f05, max_f05_minus_floor,
        max_f05_threshold, error_rate, pixels."""
        f05, threshold = self.max_f05()
        aupr, error_rate = self.aupr(), self.error_rate()
        return {
            "auroc": self.auroc(),
            "aupr": aupr,
            "aupr_minus_error_rate": aupr - error_rate,
            "fpr95": self.fpr_at_tpr(0.95),
            "max_f05": f05,
            "max_f05_minus_floor": f05 - self.f05_floor(),
            "max_f05_threshold": threshold,
            "error_rate": error_rate,
            "pixels": self.count(),
        }


class CalibrationBins(_Accumulator):
    """Equal-width confidence bins on [0, 1] for expected calibration error and reliability diagrams.

    Bin ``b`` holds confidences in [b/n, (b+1)/n); a confidence of exactly 1 goes to the last bin.
    """

    def __init__(self, n_bins: int = ECE_BINS, device: torch.device | str = "cpu") -> None:
        if n_bins <= 0:
            raise ValueError("n_bins must be positive")
        self.n_bins = n_bins
        self._tensors = [
            torch.zeros(n_bins, dtype=torch.int64, device=device),  # pixels per bin
            torch.zeros(n_bins, dtype=torch.int64, device=device),  # correct pixels per bin
            torch.zeros(n_bins, dtype=torch.float64, device=device),  # sum of confidences per bin
        ]

    def update(self, confidence: torch.Tensor, correct: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Count pixels by confidence bin; ``correct`` True = right prediction; ``valid`` False = skipped."""
        conf = torch.nan_to_num(confidence.detach().reshape(-1).to(torch.float64), nan=0.0).clamp(0.0, 1.0)
        idx = torch.floor(conf * self.n_bins).long().clamp_max(self.n_bins - 1)
        ok = _bool_flat(correct, idx.numel(), "correct").to(idx.device)
        keep = _valid_mask(valid, idx.numel(), idx.device)
        if keep is not None:
            idx, ok, conf = idx[keep], ok[keep], conf[keep]
        self._to_device(idx.device)
        n = self.n_bins
        self._tensors[0] += torch.bincount(idx, minlength=n)
        self._tensors[1] += torch.bincount(idx[ok], minlength=n)
        self._tensors[2] += torch.bincount(idx, weights=conf, minlength=n)

    def count(self) -> int:
        """Number of counted pixels."""
        return int(self._tensors[0].sum())

    def ece(self) -> float:
        """Expected calibration error ``sum_b (n_b / N) |acc_b - conf_b|``; NaN before any pixel."""
        count, correct, conf_sum = (t.cpu().numpy() for t in self._tensors)
        total = count.sum()
        if total == 0:
            return math.nan
        return float(np.sum(np.abs(correct - conf_sum)) / total)

    def reliability(self) -> dict[str, np.ndarray]:
        """Per bin: ``bin_lower``, ``bin_upper``, mean ``confidence``, ``accuracy`` (NaN when empty), ``count``."""
        count, correct, conf_sum = (t.cpu().numpy() for t in self._tensors)
        edges = np.linspace(0.0, 1.0, self.n_bins + 1)
        return {
            "bin_lower": edges[:-1],
            "bin_upper": edges[1:],
            "confidence": _ratio(conf_sum, count),
            "accuracy": _ratio(correct, count),
            "count": count.copy(),
        }

    def to_dict(self) -> dict[str, float | int | list]:
        """ECE, overall accuracy and mean confidence, pixel count, and the per-bin reliability lists."""
        count, correct, conf_sum = (t.cpu().numpy() for t in self._tensors)
        total = count.sum()
        rel = self.reliability()
        return {
            "ece": self.ece(),
            "accuracy": float(correct.sum() / total) if total else math.nan,
            "mean_confidence": float(conf_sum.sum() / total) if total else math.nan,
            "pixels": int(total),
            "n_bins": self.n_bins,
            "bin_confidence": rel["confidence"].tolist(),
            "bin_accuracy": rel["accuracy"].tolist(),
            "bin_count": rel["count"].tolist(),
        }
