"""Classification metrics computed from predicted probabilities: calibration, per-class recall, a
label-free score.

Pure numpy on purpose (no torch, no sklearn state): evaluate calls these per strategy and seed, and the
unit tests check them against hand-worked examples.

Expected calibration error (Guo et al., 2017, "On Calibration of Modern Neural Networks"): split the
top-label confidences into ``n_bins`` equal-width bins on [0, 1]; in each bin compare the mean confidence
with the accuracy; ECE is the count-weighted mean gap,

    ECE = Σ_b (|B_b| / N) · |acc(B_b) − conf(B_b)|.

A model that says "90 %" should be right 90 % of the time: ECE near 0 means its probabilities can be
taken at face value (a consumer thresholding on ``confidence`` relies on that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Reliability", "reliability", "expected_calibration_error", "per_class_recall", "information_maximisation", "nll"]

DEFAULT_BINS = 15


@dataclass(frozen=True)
class Reliability:
    """Per-bin statistics of a reliability diagram (empty bins have count 0 and NaN means)."""

    edges: np.ndarray  # n_bins + 1 bin edges on [0, 1]
    count: np.ndarray  # images per bin
    confidence: np.ndarray  # mean top-label confidence per bin
    accuracy: np.ndarray  # fraction correct per bin

    @property
    def ece(self) -> float:
        n = int(self.count.sum())
        if n == 0:
            return float("nan")
        filled = self.count > 0
        gaps = np.abs(self.accuracy[filled] - self.confidence[filled])
        return float((self.count[filled] * gaps).sum() / n)

    def rows(self) -> list[dict]:
        """One dict per bin (the form DVC plots and the report read)."""
        return [
            {"bin_lower": float(lo), "bin_upper": float(hi), "bin_center": float((lo + hi) / 2), "count": int(c),
             "confidence": None if c == 0 else float(conf), "accuracy": None if c == 0 else float(acc)}
            for lo, hi, c, conf, acc in zip(self.edges[:-1], self.edges[1:], self.count, self.confidence, self.accuracy)
        ]


def _check(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    if probs.ndim != 2 or len(probs) != len(labels):
        raise ValueError(f"expected probs N×C and N labels, got {probs.shape} and {labels.shape}")
    return probs, labels


def reliability(probs: np.ndarray, labels: np.ndarray, n_bins: int = DEFAULT_BINS) -> Reliability:
    """Bin the top-label confidence; a confidence equal to an inner edge goes to the upper bin, 1.0 to the
    last bin (so every prediction lands in exactly one bin)."""
    if n_bins < 1:
        raise ValueError("n_bins must be at least 1")
    probs, labels = _check(probs, labels)
    conf = probs.max(1) if len(probs) else np.zeros(0)
    correct = (probs.argmax(1) == labels).astype(np.float64) if len(probs) else np.zeros(0)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        acc = np.bincount(idx, weights=correct, minlength=n_bins) / count
    return Reliability(edges, count, mean_conf, acc)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = DEFAULT_BINS) -> float:
    return reliability(probs, labels, n_bins).ece


def per_class_recall(pred: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Recall of every class (NaN for a class with no true example): the per-class view that an overall
    accuracy hides — a transfer that helps nine digits and breaks one shows here."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    support = np.bincount(labels, minlength=n_classes).astype(np.float64)
    hits = np.bincount(labels[pred == labels], minlength=n_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, hits / support, np.nan)


def confusion(pred: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts of (true class, predicted class): row i, column j is how many of class i were called j."""
    pred, labels = np.asarray(pred, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    return np.bincount(labels * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def macro_f1(pred: np.ndarray, labels: np.ndarray, n_classes: int) -> float:
    """The unweighted mean of each class's F1 = 2·TP / (2·TP + FP + FN) over the classes that are true or
    predicted at least once (scikit-learn's ``f1_score(average="macro")`` without ``labels``): a class the split
    holds none of and no image is called does not count as a 0. NaN for no images."""
    c = confusion(pred, labels, n_classes).astype(np.float64)
    tp = np.diag(c)
    denom = c.sum(0) + c.sum(1)  # (TP + FP) + (TP + FN)
    present = denom > 0
    return float(np.mean(2 * tp[present] / denom[present])) if present.any() else float("nan")


def wilson_interval(accuracy: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The 95 % Wilson score interval of an accuracy measured on ``n`` images (one model, one test split): how
    far the number could move on another draw of test images of the same size. (NaN, NaN) for no images."""
    if n <= 0 or accuracy is None or math.isnan(accuracy):
        return float("nan"), float("nan")
    z2 = z * z
    centre = (accuracy + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (probabilities clipped at 1e-12)."""
    probs, labels = _check(probs, labels)
    if not len(labels):
        return float("nan")
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())


def information_maximisation(probs: np.ndarray) -> float:
    """Label-free quality score on unlabeled images, in [−1, 1] (higher is better):
    (H(mean p) − mean H(p)) / log C — diverse across images, confident on each. A model collapsed onto one
    class, or unsure of everything, scores low. Used to choose the candidate when the target has no labels
    (``target.k`` = 0)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, None)
    if p.ndim != 2 or not len(p):
        return float("nan")
    cond = float(-(p * np.log(p)).sum(1).mean())
    mean = p.mean(0)
    marg = float(-(mean * np.log(mean)).sum())
    return (marg - cond) / math.log(p.shape[1]) if p.shape[1] > 1 else 0.0
