"""Uncertainty by the bootstrap: patients are resampled with replacement (Efron & Tibshirani 1993),
and the 2.5 and 97.5 percentiles of a metric over the resamples form the 95 % interval.

When one patient contributes several predictions (e.g. several random modality masks), the
resampling unit stays the patient (a cluster bootstrap), so repeated masks do not shrink the
interval artificially.

A leaf module (numpy only) so that every consumer of a fitted model (evaluation, explain) can use it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

MetricFn = Callable[[np.ndarray, np.ndarray], float]


def bootstrap_ci(
    y_true: np.ndarray,
    probs: np.ndarray,
    metric: MetricFn,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    clusters: np.ndarray | None = None,
) -> dict[str, float]:
    """Point estimate and percentile interval of ``metric(y_true, probs)``.

    Resamples whose metric is undefined (NaN, e.g. a class missing) are dropped; ``n_valid`` says
    how many were left.
    """
    y_true, probs = np.asarray(y_true), np.asarray(probs)
    rng = np.random.default_rng(seed)
    if clusters is None:
        groups = [np.array([i]) for i in range(len(y_true))]
    else:
        clusters = np.asarray(clusters)
        groups = [np.flatnonzero(clusters == c) for c in np.unique(clusters)]
    values = []
    for _ in range(n_resamples):
        chosen = rng.integers(0, len(groups), size=len(groups))
        rows = np.concatenate([groups[g] for g in chosen])
        value = metric(y_true[rows], probs[rows])
        if np.isfinite(value):
            values.append(value)
    alpha = (1.0 - confidence) / 2.0
    point = metric(y_true, probs)
    if not values:
        return {"value": float(point), "ci_low": float("nan"), "ci_high": float("nan"), "n_valid": 0}
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return {"value": float(point), "ci_low": float(low), "ci_high": float(high), "n_valid": len(values)}


def bootstrap_mean(
    values: np.ndarray, n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> dict[str, float]:
    """Mean of per-patient ``values`` (n,) with its patients-resampled percentile interval; NaN values are
    dropped first. With no finite value the mean and interval are NaN and ``n`` is 0."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return {"value": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n_valid": 0, "n": 0}
    interval = bootstrap_ci(values, values, lambda sample, _: float(np.mean(sample)), n_resamples, seed, confidence)
    return {**interval, "n": len(values)}


def paired_difference(
    y_true: np.ndarray,
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    metric: MetricFn,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, float]:
    """``metric(y, probs_a) − metric(y, probs_b)`` on the same patients, with a paired percentile interval.

    Both models are scored on the *same* resampled patients in every resample, so what the interval
    measures is the difference between the models, not the patient-to-patient noise that two
    independent intervals would each carry. Resamples where either metric is undefined are dropped.

    Raises:
        ValueError: the two prediction arrays are not for the same patients (shapes differ).
    """
    y_true, probs_a, probs_b = np.asarray(y_true), np.asarray(probs_a), np.asarray(probs_b)
    if probs_a.shape != probs_b.shape or len(probs_a) != len(y_true):
        raise ValueError(f"paired predictions must have one row per patient: {probs_a.shape}, {probs_b.shape}, "
                         f"{len(y_true)} patients")

    def difference(t: np.ndarray, rows: np.ndarray) -> float:
        return metric(t, probs_a[rows]) - metric(t, probs_b[rows])

    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_resamples):
        rows = rng.integers(0, len(y_true), size=len(y_true))
        value = difference(y_true[rows], rows)
        if np.isfinite(value):
            values.append(value)
    point = difference(y_true, np.arange(len(y_true)))
    if not values:
        return {"value": float(point), "ci_low": float("nan"), "ci_high": float("nan"), "n_valid": 0}
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return {"value": float(point), "ci_low": float(low), "ci_high": float(high), "n_valid": len(values)}
