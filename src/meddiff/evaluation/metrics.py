"""Classification metrics (proposal §3.6): AUC-ROC (one-vs-rest, macro), F1 (macro), accuracy.

Classes absent from ``y_true`` have no defined one-vs-rest AUC; the macro AUC averages over the
classes present (and says which in ``auc_classes``) instead of failing, which matters for small test
splits of a rare disease.
"""

from __future__ import annotations

import numpy as np


def classification_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float | list[int]]:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

    y_true = np.asarray(y_true)
    n_classes = probs.shape[1]
    y_pred = probs.argmax(axis=1)
    present = [c for c in range(n_classes) if (y_true == c).any() and (y_true != c).any()]
    per_class = {c: float(roc_auc_score(y_true == c, probs[:, c])) for c in present}
    return {
        "auc_macro": float(np.mean(list(per_class.values()))) if per_class else float("nan"),
        "auc_per_class": {str(c): auc for c, auc in per_class.items()},
        "f1_macro": float(f1_score(y_true, y_pred, labels=list(range(n_classes)), average="macro", zero_division=0)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "auc_classes": present,
        "n": len(y_true),
    }
