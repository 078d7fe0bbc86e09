"""Per-patient scores → means with 95 % bootstrap intervals (patients resampled), overall, per class and
on the visible-lesion subset; the healthy patients' maps; deletion-curve areas."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from meddiff.explain.deletion import RANDOM, curve_area
from meddiff.explain.localisation import SCORES
from meddiff.intervals import bootstrap_mean

#: The processed array with each patient's lesion-to-surrounding contrast (HU; NaN without a lesion).
LESION_CONTRAST = "lesion_contrast_hu"


def score_means(rows: Sequence[Mapping[str, float]], n_bootstrap: int, seed: int) -> dict[str, dict[str, float]]:
    """Mean and interval of each of :data:`~meddiff.explain.localisation.SCORES` over ``rows``."""
    return {key: bootstrap_mean(np.array([r[key] for r in rows], float), n_bootstrap, seed) for key in SCORES}


def localisation_summary(
    rows: Sequence[Mapping[str, float]],
    classes: Sequence[str],
    visible: np.ndarray | None,
    n_bootstrap: int,
    seed: int,
) -> dict[str, Any]:
    """``all``, ``by_class`` and ``visible`` (a string saying why not, when the data has no contrast)
    summaries of one map's per-patient ``rows``; ``classes`` (n,) names each row's true class."""
    classes = np.asarray(classes)
    by_class = {
        str(name): score_means([r for r, c in zip(rows, classes, strict=True) if c == name], n_bootstrap, seed)
        for name in sorted(set(classes.tolist()))
    }
    if visible is None:
        subset: dict[str, Any] | str = f"not available (the processed data has no {LESION_CONTRAST})"
    else:
        subset = score_means([r for r, v in zip(rows, visible, strict=True) if v], n_bootstrap, seed)
    return {"all": score_means(rows, n_bootstrap, seed), "by_class": by_class, "visible": subset}


def visible_lesions(arrays: Mapping[str, np.ndarray], index: np.ndarray, min_contrast_hu: float) -> np.ndarray | None:
    """(n,) whether each patient of ``index`` has a lesion with contrast ≥ ``min_contrast_hu``; None when
    the processed data records no contrast."""
    if LESION_CONTRAST not in arrays:
        return None
    contrast = np.asarray(arrays[LESION_CONTRAST], float)[index]
    return np.nan_to_num(contrast, nan=-np.inf) >= min_contrast_hu


def healthy_summary(
    peaks: np.ndarray,
    spreads: np.ndarray,
    probabilities: np.ndarray,
    predicted: Sequence[str],
    lesion_peaks: np.ndarray,
    n_bootstrap: int,
    seed: int,
) -> dict[str, Any]:
    """What one method's maps show on healthy patients: peak relative to the median peak on lesion
    patients (a map as strong as on a lesion says "something is here"), spread, the probability of the
    predicted class, and how often each class is predicted."""
    reference = float(np.median(lesion_peaks)) if len(lesion_peaks) else float("nan")
    ratio = peaks / reference if reference > 0 else np.full(len(peaks), np.nan)
    names, counts = np.unique(np.asarray(predicted, str), return_counts=True)
    return {
        "n": len(peaks),
        "peak_ratio": bootstrap_mean(ratio, n_bootstrap, seed),
        "spread": bootstrap_mean(spreads, n_bootstrap, seed),
        "probability": bootstrap_mean(probabilities, n_bootstrap, seed),
        "predicted": {str(n): int(c) for n, c in zip(names, counts, strict=True)},
    }


def deletion_summary(
    curves: Sequence[Mapping[str, Mapping[str, np.ndarray]]], method: str, modalities: Sequence[str],
    n_bootstrap: int, seed: int,
) -> dict[str, dict[str, Any]]:
    """Per modality: mean deletion curve of ``method``'s map and of the random order, their areas and
    ``random − map``, over the patients (one :func:`~meddiff.explain.deletion.patient_curves` result
    each) that have the modality."""
    summary = {}
    for modality in modalities:
        pairs = [(c[method][modality], c[RANDOM][modality]) for c in curves if modality in c[method]]
        if not pairs:
            continue
        ranked, randomised = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
        area, area_random = curve_area(ranked), curve_area(randomised)
        summary[modality] = {
            "curve": ranked.mean(axis=0).round(4).tolist(),
            "curve_random": randomised.mean(axis=0).round(4).tolist(),
            "auc": bootstrap_mean(area, n_bootstrap, seed),
            "auc_random": bootstrap_mean(area_random, n_bootstrap, seed),
            "random_minus_map": bootstrap_mean(area_random - area, n_bootstrap, seed),
        }
    return summary
