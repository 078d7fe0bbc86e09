"""Classification metrics (proposal §3.6): AUC-ROC, F1, accuracy, plus balanced accuracy,
calibration and fairness gaps.

Classes absent from ``y_true`` have no defined one-vs-rest AUC; the macro AUC averages over the
classes present (and says which in ``auc_classes``) instead of failing, which matters for small test
splits of a rare disease.

A leaf module (it imports nothing from meddiff): training's per-epoch validation and every
evaluation report compute the same numbers with the same functions.
"""

from __future__ import annotations

import numpy as np


def _present_classes(y_true: np.ndarray, n_classes: int) -> list[int]:
    return [c for c in range(n_classes) if (y_true == c).any() and (y_true != c).any()]


def binary_auc(target: np.ndarray, score: np.ndarray) -> float:
    """AUC-ROC as the Mann-Whitney U statistic, U / (n₊ n₋), with mid-ranks for ties (equal to
    scikit-learn's ``roc_auc_score``, and cheap enough for thousands of bootstrap resamples)."""
    from scipy.stats import rankdata

    target = np.asarray(target, dtype=bool)
    n_pos = int(target.sum())
    n_neg = len(target) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[target].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auc_macro(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Macro one-vs-rest AUC-ROC over the classes present in ``y_true``."""
    present = _present_classes(np.asarray(y_true), probs.shape[1])
    if not present:
        return float("nan")
    return float(np.mean([binary_auc(np.asarray(y_true) == c, probs[:, c]) for c in present]))


def auc_one_vs_rest(y_true: np.ndarray, probs: np.ndarray, positive: int) -> float:
    return binary_auc(np.asarray(y_true) == positive, probs[:, positive])


def f1_macro(y_true: np.ndarray, probs: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    labels = list(range(probs.shape[1]))
    return float(f1_score(y_true, probs.argmax(axis=1), labels=labels, average="macro", zero_division=0))


def accuracy(y_true: np.ndarray, probs: np.ndarray) -> float:
    return float(np.mean(np.asarray(y_true) == probs.argmax(axis=1)))


def balanced_accuracy(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Mean recall over the classes present in ``y_true``."""
    y_true, predicted = np.asarray(y_true), probs.argmax(axis=1)
    recalls = [np.mean(predicted[y_true == c] == c) for c in np.unique(y_true)]
    return float(np.mean(recalls))


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> float:
    """Top-label ECE (Guo et al. 2017, eq. 3): Σ_b |B_b|/n · |acc(B_b) − conf(B_b)| over equal-width bins."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(y_true)
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        members = bins == b
        if members.any():
            ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(ece)


def equalised_odds_difference(y_true: np.ndarray, probs: np.ndarray, group: np.ndarray) -> float:
    """Largest gap in true- or false-positive rate between two groups, over one-vs-rest decisions
    (Hardt et al. 2016); NaN where a rate is undefined in a group."""
    y_true, predicted, group = np.asarray(y_true), probs.argmax(axis=1), np.asarray(group, dtype=bool)
    gaps = []
    for c in range(probs.shape[1]):
        for condition in (y_true == c, y_true != c):  # TPR on positives, FPR on negatives
            rates = []
            for members in (group, ~group):
                rows = condition & members
                rates.append(np.mean(predicted[rows] == c) if rows.any() else np.nan)
            if np.all(np.isfinite(rates)):
                gaps.append(abs(rates[0] - rates[1]))
    return float(max(gaps)) if gaps else float("nan")


METRICS = {
    "auc_macro": auc_macro,
    "f1_macro": f1_macro,
    "accuracy": accuracy,
    "balanced_accuracy": balanced_accuracy,
    "ece": expected_calibration_error,
}


def classification_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float | list[int] | dict]:
    y_true = np.asarray(y_true)
    present = _present_classes(y_true, probs.shape[1])
    return {
        **{name: fn(y_true, probs) for name, fn in METRICS.items()},
        "auc_per_class": {str(c): auc_one_vs_rest(y_true, probs, c) for c in present},
        "auc_classes": present,
        "n": len(y_true),
    }
