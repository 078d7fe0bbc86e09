"""Uncertainty by the bootstrap: patients are resampled with replacement (Efron & Tibshirani 1993),
and the 2.5 and 97.5 percentiles of a metric over the resamples form the 95 % interval.

When one patient contributes several predictions (e.g. several random modality masks), the
resampling unit stays the patient (a cluster bootstrap), so repeated masks do not shrink the
interval artificially.
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
