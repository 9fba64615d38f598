"""Classification metrics, bootstrap intervals, DeLong's test and Benjamini-Hochberg.

Metrics are written in numpy (not scikit-learn) because the bootstrap calls them thousands of times;
tests check that each equals scikit-learn's on fixed inputs. Labels are class indices 0..C-1 and
scores are a (N, C) matrix of class probabilities; binary metrics use one column (the positive
class). A metric that needs both (all) classes returns NaN when the labels lack one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy.stats import norm, rankdata

METRICS = ("auroc", "auprc", "balanced_accuracy", "f1")
METRIC_TITLES = {
    "auroc": "AUROC",
    "auprc": "AUPRC",
    "balanced_accuracy": "Balanced accuracy",
    "f1": "F1",
}


def binary_auroc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half): the Mann-Whitney U statistic over m*n."""
    positive = np.asarray(positive, dtype=bool)
    m = int(positive.sum())
    n = positive.size - m
    if m == 0 or n == 0:
        return math.nan
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - m * (m + 1) / 2) / (m * n))


def binary_average_precision(positive: np.ndarray, scores: np.ndarray) -> float:
    """Average precision as scikit-learn computes it: sum over thresholds of dRecall * precision."""
    positive = np.asarray(positive, dtype=bool)
    if not positive.any():
        return math.nan
    order = np.argsort(-np.asarray(scores, dtype=float), kind="mergesort")
    sorted_scores = np.asarray(scores, dtype=float)[order]
    hits = positive[order]
    # one point per distinct score, at the last sample that has it
    last = np.r_[np.flatnonzero(np.diff(sorted_scores)), hits.size - 1]
    tps = np.cumsum(hits)[last]
    precision = tps / (last + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def balanced_accuracy(y: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    """Mean recall over the classes present in `y`."""
    recalls = [np.mean(pred[y == c] == c) for c in range(n_classes) if np.any(y == c)]
    return float(np.mean(recalls)) if recalls else math.nan


def _f1(y: np.ndarray, pred: np.ndarray, c: int) -> float:
    tp = np.sum((pred == c) & (y == c))
    denominator = np.sum(pred == c) + np.sum(y == c)
    return float(2 * tp / denominator) if denominator else 0.0


def classification_metrics(
    y: np.ndarray, proba: np.ndarray, positive: int | None = None
) -> dict[str, float]:
    """AUROC, AUPRC, balanced accuracy and F1 of one set of predictions.

    Binary (two columns): AUROC/AUPRC of the `positive` column (default 1), F1 of the positive
    class. Multiclass: one-vs-rest macro AUROC and AUPRC, macro F1. Predictions are the argmax.
    """
    y = np.asarray(y, dtype=int)
    proba = np.asarray(proba, dtype=float)
    n_classes = proba.shape[1]
    pred = np.argmax(proba, axis=1)
    if n_classes == 2:
        c = 1 if positive is None else positive
        complete = np.unique(y).size == 2
        return {
            "auroc": binary_auroc(y == c, proba[:, c]) if complete else math.nan,
            "auprc": binary_average_precision(y == c, proba[:, c]) if complete else math.nan,
            "balanced_accuracy": balanced_accuracy(y, pred, 2),
            "f1": _f1(y, pred, c),
        }
    if np.unique(y).size < n_classes:
        auroc = auprc = math.nan
    else:
        auroc = float(np.mean([binary_auroc(y == c, proba[:, c]) for c in range(n_classes)]))
        auprc = float(
            np.mean([binary_average_precision(y == c, proba[:, c]) for c in range(n_classes)])
        )
    return {
        "auroc": auroc,
        "auprc": auprc,
        "balanced_accuracy": balanced_accuracy(y, pred, n_classes),
        "f1": float(np.mean([_f1(y, pred, c) for c in range(n_classes)])),
    }


class BootstrapResult(NamedTuple):
    low: dict[str, float]
    high: dict[str, float]
    n_valid: int


def bootstrap_ci(
    y: np.ndarray,
    proba: np.ndarray,
    positive: int | None = None,
    n: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> BootstrapResult:
    """Percentile intervals of every metric over `n` patient resamples (with replacement).

    Resamples that lack a class are skipped (counted in n_valid), so every metric is defined on
    every resample used. The same seed draws the same resamples for equally long inputs, which
    keeps intervals of different embeddings on the same patients paired.
    """
    y = np.asarray(y, dtype=int)
    proba = np.asarray(proba, dtype=float)
    n_classes = proba.shape[1]
    rng = np.random.default_rng(seed)
    values: dict[str, list[float]] = {m: [] for m in METRICS}
    for _ in range(n):
        index = rng.integers(0, y.size, y.size)
        if np.unique(y[index]).size < n_classes:
            continue
        for metric, value in classification_metrics(y[index], proba[index], positive).items():
            values[metric].append(value)
    n_valid = len(values["auroc"])
    tail = (1 - level) / 2 * 100
    low, high = {}, {}
    for metric, samples in values.items():
        if samples:
            low[metric], high[metric] = (
                float(v) for v in np.percentile(samples, [tail, 100 - tail])
            )
        else:
            low[metric] = high[metric] = math.nan
    return BootstrapResult(low, high, n_valid)


class DeLongResult(NamedTuple):
    """Two correlated AUCs on the same patients, the z statistic of their difference, and p."""

    auc_a: float
    auc_b: float
    z: float
    p: float


def _structural_components(
    positive: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUCs (k,), V10 (k, m) and V01 (k, n) of k score rows by midranks (Sun & Xu 2014).

    V10[i] is the fraction of negatives a positive i outranks (ties one half), V01[j] the
    fraction of positives that outrank negative j; computed in O(k (m+n) log(m+n)).
    """
    x = scores[:, positive]
    y = scores[:, ~positive]
    m, n = x.shape[1], y.shape[1]
    tx = rankdata(x, axis=1)
    ty = rankdata(y, axis=1)
    tz = rankdata(np.concatenate([x, y], axis=1), axis=1)
    aucs = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    return aucs, v10, v01


def delong_test(
    y_true: Sequence[int] | np.ndarray,
    scores_a: Sequence[float] | np.ndarray,
    scores_b: Sequence[float] | np.ndarray,
) -> DeLongResult:
    """DeLong's two-sided test that two ROC curves on the same patients have equal AUC.

    y_true: 1 (or True) for the positive class. Identical scores give z = 0 and p = 1; a zero
    variance estimate with unequal AUCs gives z = p = NaN.
    """
    positive = np.asarray(y_true).astype(bool)
    scores = np.vstack([np.asarray(scores_a, dtype=float), np.asarray(scores_b, dtype=float)])
    if scores.shape[1] != positive.size:
        raise ValueError(f"{positive.size} labels but {scores.shape[1]} scores")
    m = int(positive.sum())
    n = positive.size - m
    if m < 2 or n < 2:
        raise ValueError(f"DeLong's test needs two or more of each class (have {m} and {n})")
    aucs, v10, v01 = _structural_components(positive, scores)
    covariance = np.cov(v10) / m + np.cov(v01) / n
    variance = covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1]
    difference = aucs[0] - aucs[1]
    if variance <= 0:
        # every placement is constant (curves perfect, reversed or flat): equal AUCs are no
        # evidence of a difference, unequal ones leave the test undefined rather than p = 0
        if difference == 0:
            return DeLongResult(float(aucs[0]), float(aucs[1]), 0.0, 1.0)
        return DeLongResult(float(aucs[0]), float(aucs[1]), math.nan, math.nan)
    z = difference / math.sqrt(variance)
    return DeLongResult(float(aucs[0]), float(aucs[1]), float(z), float(2 * norm.sf(abs(z))))


def benjamini_hochberg(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (step-up FDR), in input order; NaN stays NaN."""
    p = np.asarray(pvalues, dtype=float)
    adjusted = np.full(p.shape, math.nan)
    valid = ~np.isnan(p)
    values = p[valid]
    if values.size == 0:
        return adjusted
    order = np.argsort(values, kind="mergesort")
    scaled = values[order] * values.size / np.arange(1, values.size + 1)
    monotone = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    result = np.empty_like(values)
    result[order] = monotone
    adjusted[valid] = result
    return adjusted


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean and sample standard deviation (ddof 1) of the finite values, and how many there were."""
    finite = np.asarray([v for v in values if v == v and math.isfinite(v)], dtype=float)
    if finite.size == 0:
        return math.nan, math.nan, 0
    std = float(np.std(finite, ddof=1)) if finite.size > 1 else math.nan
    return float(np.mean(finite)), std, int(finite.size)
