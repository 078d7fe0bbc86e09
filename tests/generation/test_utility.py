"""TSTR on constructed latents: synthetic data from the real population is as useful as real data; synthetic
data whose classes carry no signal is useless."""

import numpy as np
import pytest

from meddiff.generation.utility import augmentation_report, fit_predict, tstr_report
from meddiff.metrics import auc_macro

N_CLASSES = 3


def labelled(rng: np.random.Generator, n: int, shift: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, N_CLASSES, size=n)
    x = rng.normal(size=(n, 6))
    x[np.arange(n), y] += shift
    return x, y


def test_synthetic_from_the_population_is_as_useful_as_real() -> None:
    rng = np.random.default_rng(0)
    (train_x, train_y), (test_x, test_y), (syn_x, syn_y) = labelled(rng, 400), labelled(rng, 300), labelled(rng, 400)
    report = tstr_report(syn_x, syn_y, train_x, train_y, test_x, test_y, N_CLASSES, n_bootstrap=200, seed=0)
    tstr, trtr, ratio = report["tstr_auc_macro"], report["trtr_auc_macro"], report["tstr_over_trtr"]
    assert tstr["value"] == auc_macro(test_y, fit_predict(syn_x, syn_y, test_x, N_CLASSES))
    assert trtr["value"] == auc_macro(test_y, fit_predict(train_x, train_y, test_x, N_CLASSES))
    assert ratio["value"] == pytest.approx(tstr["value"] / trtr["value"])
    assert ratio["value"] == pytest.approx(1.0, abs=0.02)
    assert trtr["value"] > 0.85
    assert ratio["ci_low"] <= ratio["value"] <= ratio["ci_high"] and ratio["n_valid"] == 200


def test_synthetic_with_the_wrong_class_patterns_is_worse_than_chance() -> None:
    # each synthetic class carries the next class's pattern: a classifier trained on it ranks real patients backwards
    rng = np.random.default_rng(1)
    (train_x, train_y), (test_x, test_y), (syn_x, syn_y) = labelled(rng, 400), labelled(rng, 300), labelled(rng, 400)
    report = tstr_report(syn_x, (syn_y + 1) % N_CLASSES, train_x, train_y, test_x, test_y, N_CLASSES,
                         n_bootstrap=50, seed=0)
    assert report["tstr_auc_macro"]["ci_high"] < 0.5
    assert report["tstr_over_trtr"]["value"] < 0.6


def test_a_class_missing_from_training_gets_probability_zero() -> None:
    rng = np.random.default_rng(2)
    x, y = labelled(rng, 90)
    keep = y != 2
    probs = fit_predict(x[keep], y[keep], x, N_CLASSES)
    assert probs.shape == (90, N_CLASSES)
    np.testing.assert_array_equal(probs[:, 2], 0.0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)


def clusters(rng: np.random.Generator, counts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Class c at (4c, 4c) with unit noise: separable classes, ``counts[c]`` patients each."""
    y = np.repeat(np.arange(len(counts)), counts)
    return rng.normal(size=(len(y), 2)) * 0.5 + 4.0 * y[:, None], y


def test_augmentation_teaches_a_class_the_real_training_set_lacks() -> None:
    # no real rare patient: real-only gives the rare class probability 0 (AUC 0.5 by ties, sensitivity 0);
    # synthetic rare patients from the rare cluster make it perfectly separable (AUC 1, sensitivity 1)
    rng = np.random.default_rng(3)
    train_x, train_y = clusters(rng, [40, 40, 0])
    eval_x, eval_y = clusters(rng, [30, 30, 10])
    synthetic_x, _ = clusters(rng, [0, 0, 12])
    report = augmentation_report(train_x, train_y, synthetic_x, 2, eval_x, eval_y, N_CLASSES, 100, 0)
    assert report["n_synthetic_added"] == 12 and report["n_eval_rare"] == 10 and report["n_real_train_rare"] == 0
    assert report["rare_auc"]["real_only"]["value"] == 0.5
    assert report["rare_auc"]["augmented"]["value"] == 1.0
    assert report["rare_auc"]["difference"] == pytest.approx(
        {"value": 0.5, "ci_low": 0.5, "ci_high": 0.5, "n_valid": 100})
    assert report["rare_sensitivity"]["real_only"]["value"] == 0.0
    assert report["rare_sensitivity"]["difference"]["value"] == 1.0
    assert report["auc_macro"]["difference"]["value"] > 0


def test_adding_no_synthetic_patient_changes_nothing() -> None:
    rng = np.random.default_rng(4)
    train_x, train_y = clusters(rng, [40, 40, 3])
    eval_x, eval_y = clusters(rng, [30, 30, 5])
    report = augmentation_report(train_x, train_y, np.empty((0, 2)), 2, eval_x, eval_y, N_CLASSES, 50, 0)
    for name in ("rare_auc", "rare_sensitivity", "auc_macro"):
        assert report[name]["real_only"] == report[name]["augmented"]
        assert report[name]["difference"]["value"] == 0.0 == report[name]["difference"]["ci_high"]


def test_augmentation_needs_a_rare_patient_to_evaluate_on() -> None:
    rng = np.random.default_rng(5)
    train_x, train_y = clusters(rng, [10, 10, 2])
    eval_x, eval_y = clusters(rng, [5, 5, 0])
    with pytest.raises(ValueError, match="no patient of class 2"):
        augmentation_report(train_x, train_y, train_x[train_y == 2], 2, eval_x, eval_y, N_CLASSES, 10, 0)
