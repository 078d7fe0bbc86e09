import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

from meddiff.intervals import bootstrap_ci
from meddiff.metrics import (
    auc_macro,
    binary_auc,
    classification_metrics,
    equalised_odds_difference,
    expected_calibration_error,
)


def _case(seed: int = 0, n: int = 200):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    probs = rng.dirichlet(np.ones(3), n)
    probs[np.arange(n), y] += 0.3
    return y, probs / probs.sum(1, keepdims=True)


def test_metrics_match_sklearn() -> None:
    y, probs = _case()
    metrics = classification_metrics(y, probs)
    assert np.isclose(metrics["auc_macro"], roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert np.isclose(metrics["f1_macro"], f1_score(y, probs.argmax(1), average="macro"))
    assert np.isclose(metrics["accuracy"], accuracy_score(y, probs.argmax(1)))
    assert np.isclose(metrics["balanced_accuracy"], balanced_accuracy_score(y, probs.argmax(1)))


def test_binary_auc_handles_ties_like_sklearn() -> None:
    target = np.array([0, 1, 1, 0, 1, 0, 0])
    score = np.array([0.2, 0.5, 0.5, 0.5, 0.9, 0.1, 0.2])
    assert np.isclose(binary_auc(target, score), roc_auc_score(target, score))


def test_absent_class_is_skipped_not_fatal() -> None:
    y = np.array([0, 1, 0, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1]])
    metrics = classification_metrics(y, probs)
    assert metrics["auc_classes"] == [0, 1]
    assert metrics["auc_macro"] == 1.0


def test_ece_perfectly_calibrated_and_overconfident() -> None:
    y = np.array([0, 0, 0, 1])
    calibrated = np.tile([0.75, 0.25], (4, 1))  # says 75 %, right 3 of 4 times
    assert np.isclose(expected_calibration_error(y, calibrated), 0.0)
    overconfident = np.tile([0.99, 0.01], (4, 1))
    assert np.isclose(expected_calibration_error(y, overconfident), 0.24)


def test_equalised_odds_difference() -> None:
    y = np.array([1, 1, 0, 0, 1, 1, 0, 0])
    group = np.array([True] * 4 + [False] * 4)
    probs = np.array([[0.1, 0.9]] * 2 + [[0.9, 0.1]] * 2 + [[0.9, 0.1]] * 2 + [[0.9, 0.1]] * 2)
    # group A: TPR 1, group B: TPR 0 → gap 1
    assert equalised_odds_difference(y, probs, group) == 1.0
    assert equalised_odds_difference(y, probs, np.ones(8, bool)) != equalised_odds_difference(y, probs, group)


def test_bootstrap_interval_covers_the_true_auc() -> None:
    """Simulated scores with a known population AUC: the 95 % interval should cover it ~95 % of the time."""
    from scipy.stats import norm

    shift = 1.0
    true_auc = norm.cdf(shift / np.sqrt(2))  # P(X+ > X−) for N(shift, 1) vs N(0, 1)
    covered = 0
    trials = 40
    for trial in range(trials):
        rng = np.random.default_rng(trial)
        y = rng.integers(0, 2, 150)
        score = rng.normal(size=150) + shift * y
        probs = np.stack([1 - score, score], axis=1)
        ci = bootstrap_ci(y, probs, auc_macro, n_resamples=300, seed=trial)
        covered += ci["ci_low"] <= true_auc <= ci["ci_high"]
    assert covered >= 0.85 * trials, f"covered {covered}/{trials}"


def test_cluster_bootstrap_is_wider_than_naive_for_repeated_rows() -> None:
    y, probs = _case(1, 60)
    repeated_y, repeated_probs = np.tile(y, 5), np.tile(probs, (5, 1))
    clusters = np.tile(np.arange(60), 5)
    naive = bootstrap_ci(repeated_y, repeated_probs, auc_macro, n_resamples=300)
    clustered = bootstrap_ci(repeated_y, repeated_probs, auc_macro, n_resamples=300, clusters=clusters)
    assert (clustered["ci_high"] - clustered["ci_low"]) > (naive["ci_high"] - naive["ci_low"])
