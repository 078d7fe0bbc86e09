import numpy as np
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from meddiff.evaluation.metrics import classification_metrics


def test_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    probs = rng.dirichlet(np.ones(3), 200)
    probs[np.arange(200), y] += 0.3
    probs /= probs.sum(1, keepdims=True)
    metrics = classification_metrics(y, probs)
    assert np.isclose(metrics["auc_macro"], roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert np.isclose(metrics["f1_macro"], f1_score(y, probs.argmax(1), average="macro"))
    assert np.isclose(metrics["accuracy"], accuracy_score(y, probs.argmax(1)))


def test_absent_class_is_skipped_not_fatal() -> None:
    y = np.array([0, 1, 0, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1]])
    metrics = classification_metrics(y, probs)
    assert metrics["auc_classes"] == [0, 1]
    assert metrics["auc_macro"] == 1.0
