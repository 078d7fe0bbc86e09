"""Usefulness of synthetic patients: train on synthetic, test on real (TSTR; Esteban et al. 2017,
"Real-valued (medical) time series generation with recurrent conditional GANs").

One classifier, two training sets, one real test set: a multinomial logistic regression on
standardised fused latents z (scikit-learn), fitted on the synthetic latents and their sampled classes
(TSTR) and, as the reference, on the real training split's latents (train on real, TRTR). Both are
scored on the real test split by the macro one-vs-rest AUC (:func:`meddiff.metrics.auc_macro`), with 95 %
bootstrap intervals over test patients (:mod:`meddiff.intervals`); the ratio TSTR / TRTR is
bootstrapped on the same resamples (paired). Target (issue 12): ratio ≥ 0.9.
"""

from __future__ import annotations

import numpy as np

from meddiff.intervals import bootstrap_ci
from meddiff.metrics import auc_macro

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
