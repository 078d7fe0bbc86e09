"""Usefulness of synthetic patients: train on synthetic, test on real (TSTR; Esteban et al. 2017,
"Real-valued (medical) time series generation with recurrent conditional GANs").

One classifier, two training sets, one real test set: a multinomial logistic regression on
standardised fused latents z (scikit-learn), fitted on the synthetic latents and their sampled classes
(TSTR) and, as the reference, on the real training split's latents (train on real, TRTR). Both are
scored on the real test split by the macro one-vs-rest AUC (:func:`meddiff.metrics.auc_macro`), with 95 %
bootstrap intervals over test patients (:mod:`meddiff.intervals`); the ratio TSTR / TRTR is
bootstrapped on the same resamples (paired). Target (issue 12): ratio ≥ 0.9.

Rare-class augmentation (:func:`augmentation_report`, issue 12 "adding synthetic rare patients to training
changes rare-class AUC and sensitivity by how much"): the same classifier fitted on the real training latents
alone and on them plus N synthetic patients of the rare class, both scored on one real evaluation set (the
labelled external drop, or the test split): the rare class's one-vs-rest AUC and sensitivity (recall of the
argmax), and the macro AUC as a check that the other classes do not pay for it, each difference
(augmented − real only) with a paired bootstrap interval over evaluation patients.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from meddiff.intervals import bootstrap_ci, paired_difference
from meddiff.metrics import auc_macro, binary_auc

#: inverse L2 strength of the logistic regression (scikit-learn's default)
LOGREG_C = 1.0
LOGREG_MAX_ITER = 2000


def fit_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, n_classes: int) -> np.ndarray:
    """Class probabilities (N_test, n_classes) of a balanced logistic regression fitted on ``train_x`` (N, F);
    a class absent from ``train_y`` gets probability 0."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classifier = make_pipeline(
        StandardScaler(), LogisticRegression(C=LOGREG_C, max_iter=LOGREG_MAX_ITER, class_weight="balanced")
    )
    classifier.fit(train_x, train_y)
    probs = np.zeros((len(test_x), n_classes))
    probs[:, classifier.classes_] = classifier.predict_proba(test_x)
    return probs


def tstr_report(
    synthetic_x: np.ndarray,
    synthetic_y: np.ndarray,
    real_train_x: np.ndarray,
    real_train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    n_classes: int,
    n_bootstrap: int,
    seed: int,
) -> dict[str, object]:
    """TSTR and TRTR macro AUCs on the real test set with their intervals, and their ratio (module docstring)."""
    tstr = fit_predict(synthetic_x, synthetic_y, test_x, n_classes)
    trtr = fit_predict(real_train_x, real_train_y, test_x, n_classes)

    def ratio(y: np.ndarray, both: np.ndarray) -> float:
        # A resample (or a tiny test split) where train-on-real scores 0 or NaN has no defined ratio:
        # NaN, which the bootstrap drops, rather than a division error that stops the stage.
        denominator = auc_macro(y, both[:, n_classes:])
        return auc_macro(y, both[:, :n_classes]) / denominator if denominator > 0 else float("nan")

    return {
        "classifier": "logistic regression on standardised fused latents z (balanced class weights)",
        "tstr_auc_macro": bootstrap_ci(test_y, tstr, auc_macro, n_bootstrap, seed),
        "trtr_auc_macro": bootstrap_ci(test_y, trtr, auc_macro, n_bootstrap, seed),
        "tstr_over_trtr": bootstrap_ci(test_y, np.hstack([tstr, trtr]), ratio, n_bootstrap, seed),
        "n_synthetic_train": len(synthetic_y),
        "n_real_train": len(real_train_y),
        "n_test": len(test_y),
    }


def rare_auc(rare_class: int) -> Callable[[np.ndarray, np.ndarray], float]:
    """The one-vs-rest AUC of ``rare_class`` as a metric of (labels (N,), probabilities (N, K)); NaN when the
    labels hold no patient of the class or only such patients."""

    def metric(y: np.ndarray, probs: np.ndarray) -> float:
        is_rare = y == rare_class
        return binary_auc(is_rare, probs[:, rare_class]) if 0 < is_rare.sum() < len(y) else float("nan")

    return metric


def rare_sensitivity(rare_class: int) -> Callable[[np.ndarray, np.ndarray], float]:
    """The share of ``rare_class`` patients whose most probable class is ``rare_class``; NaN without any."""

    def metric(y: np.ndarray, probs: np.ndarray) -> float:
        is_rare = y == rare_class
        return float((probs[is_rare].argmax(axis=1) == rare_class).mean()) if is_rare.any() else float("nan")

    return metric


def augmentation_report(
    real_train_x: np.ndarray,
    real_train_y: np.ndarray,
    synthetic_x: np.ndarray,
    rare_class: int,
    eval_x: np.ndarray,
    eval_y: np.ndarray,
    n_classes: int,
    n_bootstrap: int,
    seed: int,
) -> dict[str, object]:
    """Rare-class AUC, sensitivity and macro AUC on (``eval_x`` (E, F), ``eval_y`` (E,)) of the classifier trained
    on the real training set (N, F) alone and with the synthetic ``rare_class`` patients ``synthetic_x`` (S, F)
    added; values with bootstrap intervals and the paired differences augmented − real (module docstring).

    Raises:
        ValueError: the evaluation set has no patient of ``rare_class``.
    """
    if not (eval_y == rare_class).any():
        raise ValueError(f"the evaluation set has no patient of class {rare_class}: no rare-class measure")
    real = fit_predict(real_train_x, real_train_y, eval_x, n_classes)
    augmented = fit_predict(np.concatenate([real_train_x, synthetic_x]),
                            np.concatenate([real_train_y, np.full(len(synthetic_x), rare_class)]), eval_x, n_classes)
    metrics = {"rare_auc": rare_auc(rare_class), "rare_sensitivity": rare_sensitivity(rare_class),
               "auc_macro": auc_macro}
    report: dict[str, object] = {
        "classifier": "the TSTR classifier (balanced logistic regression on standardised z)",
        "rare_class": rare_class,
        "n_synthetic_added": len(synthetic_x),
        "n_real_train": len(real_train_y),
        "n_real_train_rare": int((real_train_y == rare_class).sum()),
        "n_eval": len(eval_y),
        "n_eval_rare": int((eval_y == rare_class).sum()),
    }
    for name, metric in metrics.items():
        report[name] = {
            "real_only": bootstrap_ci(eval_y, real, metric, n_bootstrap, seed),
            "augmented": bootstrap_ci(eval_y, augmented, metric, n_bootstrap, seed),
            "difference": paired_difference(eval_y, augmented, real, metric, n_bootstrap, seed),
        }
    return report
