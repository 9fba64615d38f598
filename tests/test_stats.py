"""Metrics against scikit-learn, DeLong against a brute-force computation, BH against statsmodels."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm
from sklearn import metrics as skm
from sklearn.preprocessing import label_binarize
from statsmodels.stats.multitest import multipletests

from eagleflow.stats import (
    _structural_components,
    benjamini_hochberg,
    binary_auroc,
    binary_average_precision,
    bootstrap_ci,
    classification_metrics,
    delong_test,
    mean_std,
)


def binary_case(seed: int, n: int = 40, ties: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    p1 = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.2 * y)))
    if ties:
        p1 = np.round(p1, 1)  # many tied scores: the hard case for AUC and AP
    return y, np.column_stack([1 - p1, p1])


def multiclass_case(seed: int, n: int = 60, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    logits = rng.normal(size=(n, classes)) + 1.5 * np.eye(classes)[y]
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, proba


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [True, False])
def test_binary_metrics_equal_sklearn(seed, ties):
    y, proba = binary_case(seed, ties=ties)
    ours = classification_metrics(y, proba)
    pred = proba.argmax(axis=1)
    assert ours["auroc"] == pytest.approx(skm.roc_auc_score(y, proba[:, 1]), abs=1e-12)
    assert ours["auprc"] == pytest.approx(skm.average_precision_score(y, proba[:, 1]), abs=1e-12)
    assert ours["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert ours["f1"] == pytest.approx(skm.f1_score(y, pred))


def test_binary_positive_class_zero_uses_that_column():
    y, proba = binary_case(3)
    ours = classification_metrics(y, proba, positive=0)
    pred = proba.argmax(axis=1)
    assert ours["auprc"] == pytest.approx(
        skm.average_precision_score(y == 0, proba[:, 0]), abs=1e-12
    )
    assert ours["f1"] == pytest.approx(skm.f1_score(y, pred, pos_label=0))
    assert ours["auprc"] != pytest.approx(classification_metrics(y, proba)["auprc"])


@pytest.mark.parametrize("seed", [0, 1])
def test_multiclass_metrics_equal_sklearn(seed):
    y, proba = multiclass_case(seed)
    ours = classification_metrics(y, proba)
    pred = proba.argmax(axis=1)
    assert ours["auroc"] == pytest.approx(
        skm.roc_auc_score(y, proba, multi_class="ovr", average="macro"), abs=1e-12
    )
    assert ours["auprc"] == pytest.approx(
        skm.average_precision_score(label_binarize(y, classes=[0, 1, 2]), proba, average="macro"),
        abs=1e-12,
    )
    assert ours["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert ours["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro", labels=[0, 1, 2]))


def test_metrics_that_need_every_class_are_nan_without_one():
    y = np.array([0, 0, 1, 1])
    proba = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    result = classification_metrics(y, proba)
    assert math.isnan(result["auroc"]) and math.isnan(result["auprc"])
    # predictions 0, 1, 1, 2: recall 1/2 for both classes present
    assert result["balanced_accuracy"] == pytest.approx(0.5)
    assert math.isnan(binary_auroc(np.array([True, True]), np.array([0.1, 0.2])))
    assert math.isnan(binary_average_precision(np.array([False, False]), np.array([0.1, 0.2])))


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    y, proba = binary_case(5, n=80, ties=False)
    a = bootstrap_ci(y, proba, n=200, seed=7)
    b = bootstrap_ci(y, proba, n=200, seed=7)
    c = bootstrap_ci(y, proba, n=200, seed=8)
    assert a == b
    assert a.low != c.low
    value = classification_metrics(y, proba)
    for metric in ("auroc", "auprc", "balanced_accuracy", "f1"):
        assert a.low[metric] <= value[metric] <= a.high[metric]
        assert a.low[metric] < a.high[metric]
    assert a.n_valid == 200


def test_bootstrap_skips_resamples_without_a_class():
    y = np.array([0, 0, 0, 0, 0, 1])
    proba = np.column_stack([np.linspace(0.9, 0.4, 6), np.linspace(0.1, 0.6, 6)])
    result = bootstrap_ci(y, proba, n=300, seed=0)
    # P(no positive in 6 draws) = (5/6)^6 ~ 0.33
    assert 150 < result.n_valid < 250


def brute_force_delong(y: np.ndarray, a: np.ndarray, b: np.ndarray):
    """DeLong (1988) by its definition: placements by explicit loops over every pair."""
    positives = [i for i in range(len(y)) if y[i] == 1]
    negatives = [j for j in range(len(y)) if y[j] == 0]
    m, n = len(positives), len(negatives)

    def psi(x: float, z: float) -> float:
        return 1.0 if x > z else 0.5 if x == z else 0.0

    v10 = np.zeros((2, m))
    v01 = np.zeros((2, n))
    for k, scores in enumerate((a, b)):
        for i, p in enumerate(positives):
            v10[k, i] = sum(psi(scores[p], scores[q]) for q in negatives) / n
        for j, q in enumerate(negatives):
            v01[k, j] = sum(psi(scores[p], scores[q]) for p in positives) / m
    aucs = v10.mean(axis=1)
    s10 = np.cov(v10)
    s01 = np.cov(v01)
    s = s10 / m + s01 / n
    variance = s[0, 0] + s[1, 1] - 2 * s[0, 1]
    z = (aucs[0] - aucs[1]) / math.sqrt(variance)
    return aucs, v10, v01, z, 2 * norm.sf(abs(z))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_delong_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 30 + seed * 7
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    a = rng.normal(size=n) + 1.0 * y
    b = 0.5 * a + rng.normal(size=n) + 0.3 * y
    if seed % 2:
        a, b = np.round(a, 1), np.round(b, 1)  # ties
    aucs, v10, v01, z, p = brute_force_delong(y, a, b)
    fast_aucs, fast_v10, fast_v01 = _structural_components(y.astype(bool), np.vstack([a, b]))
    np.testing.assert_allclose(fast_aucs, aucs, atol=1e-12)
    np.testing.assert_allclose(fast_v10, v10, atol=1e-12)
    np.testing.assert_allclose(fast_v01, v01, atol=1e-12)
    result = delong_test(y, a, b)
    assert result.auc_a == pytest.approx(skm.roc_auc_score(y, a), abs=1e-12)
    assert result.auc_b == pytest.approx(aucs[1], abs=1e-12)
    assert result.z == pytest.approx(z, rel=1e-9)
    assert result.p == pytest.approx(p, rel=1e-9)
    swapped = delong_test(y, b, a)
    assert swapped.z == pytest.approx(-result.z) and swapped.p == pytest.approx(result.p)


def test_delong_identical_scores_give_p_one():
    y, proba = binary_case(4)
    result = delong_test(y, proba[:, 1], proba[:, 1].copy())
    assert result.z == 0.0 and result.p == 1.0
    assert result.auc_a == result.auc_b


def test_delong_degenerate_variance_is_nan_not_zero():
    y = np.array([0, 0, 1, 1])
    result = delong_test(y, [0.1, 0.2, 0.8, 0.9], [0.5, 0.5, 0.5, 0.5])
    assert (result.auc_a, result.auc_b) == (1.0, 0.5)
    assert math.isnan(result.p)


def test_delong_rejects_too_few_of_a_class():
    with pytest.raises(ValueError, match="two or more of each class"):
        delong_test([0, 0, 1], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_benjamini_hochberg_equals_statsmodels(seed):
    rng = np.random.default_rng(seed)
    p = np.concatenate([rng.uniform(0, 0.05, 5), rng.uniform(0, 1, 20)])
    p[3] = p[4]  # a tie
    rng.shuffle(p)
    expected = multipletests(p, method="fdr_bh")[1]
    np.testing.assert_allclose(benjamini_hochberg(p), expected, rtol=1e-12)


def test_benjamini_hochberg_keeps_nan_out_of_the_count():
    p = np.array([0.01, math.nan, 0.04, 0.03])
    adjusted = benjamini_hochberg(p)
    assert math.isnan(adjusted[1])
    np.testing.assert_allclose(
        adjusted[[0, 2, 3]], multipletests([0.01, 0.04, 0.03], method="fdr_bh")[1]
    )
    assert benjamini_hochberg([]).size == 0


def test_mean_std_uses_sample_std_and_ignores_nan():
    mean, std, n = mean_std([1.0, math.nan, 3.0])
    assert (mean, n) == (2.0, 2) and std == pytest.approx(math.sqrt(2))
    assert math.isnan(mean_std([1.0])[1])
