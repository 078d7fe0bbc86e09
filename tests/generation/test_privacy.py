"""Privacy measures on constructed sets whose answer is known: copies of training patients, and independent
samples of the same population."""

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from meddiff.generation.privacy import membership_inference_auc, nearest_neighbours, privacy_report

DIM = 4


def population(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.normal(size=(n, DIM))


def test_nearest_neighbours_equal_brute_force() -> None:
    rng = np.random.default_rng(0)
    query, reference = rng.normal(size=(300, 7)), rng.normal(size=(50, 7))  # 300 rows: several chunks
    distances, indices = nearest_neighbours(query, reference)
    full = cdist(query, reference)
    np.testing.assert_array_equal(indices, full.argmin(axis=1))
    np.testing.assert_allclose(distances, full.min(axis=1), rtol=1e-5)


def test_images_are_flattened_per_patient() -> None:
    rng = np.random.default_rng(1)
    query, reference = rng.random((3, 2, 4, 4, 4)), rng.random((5, 2, 4, 4, 4))
    distances, _ = nearest_neighbours(query, reference)
    np.testing.assert_allclose(distances, cdist(query.reshape(3, -1), reference.reshape(5, -1)).min(axis=1), rtol=1e-5)


def test_mismatched_widths_are_refused() -> None:
    with pytest.raises(ValueError, match="width"):
        nearest_neighbours(np.zeros((2, 3)), np.zeros((2, 4)))


def test_copies_of_training_patients_give_ratio_zero_and_membership_auc_one() -> None:
    rng = np.random.default_rng(2)
    train, held_out = population(rng, 400), population(rng, 200)
    synthetic = train[rng.permutation(400)]
    report = privacy_report("z", synthetic, train, held_out, [f"s{i}" for i in range(400)],
                            [f"t{i}" for i in range(400)], n_pairs=3)
    assert report.distance_ratio == pytest.approx(0.0, abs=1e-6)
    assert report.n_closer_than_p1 == 400 and report.fraction_closer_than_p1 == 1.0
    assert report.membership_inference_auc == 1.0
    assert [p.distance for p in report.closest_pairs] == pytest.approx([0.0] * 3, abs=1e-6)


def test_an_independent_sample_gives_ratio_one_and_membership_auc_one_half() -> None:
    rng = np.random.default_rng(3)
    train, held_out, synthetic = population(rng, 2000), population(rng, 1000), population(rng, 1000)
    report = privacy_report("z", synthetic, train, held_out, [f"s{i}" for i in range(1000)],
                            [f"t{i}" for i in range(2000)], n_pairs=1)
    assert report.distance_ratio == pytest.approx(1.0, abs=0.06)
    assert report.fraction_closer_than_p1 == pytest.approx(0.01, abs=0.01)  # as often as a held-out patient
    assert report.membership_inference_auc == pytest.approx(0.5, abs=0.04)


def test_membership_auc_counts_the_copied_share() -> None:
    # half the members copied: those score 0 distance (ranked first), the other half ties with non-members
    rng = np.random.default_rng(4)
    train, held_out = population(rng, 1000), population(rng, 1000)
    synthetic = np.concatenate([train[:500], population(rng, 2000)])
    assert membership_inference_auc(train, held_out, synthetic)["value"] == pytest.approx(0.75, abs=0.03)
    attack = membership_inference_auc(train, held_out, synthetic, n_bootstrap=200, seed=0)
    assert attack["ci_low"] < 0.75 < attack["ci_high"] and attack["ci_high"] - attack["ci_low"] < 0.1
    assert attack["n_valid"] == 200


def test_the_attack_interval_is_reported_only_when_asked_for() -> None:
    rng = np.random.default_rng(6)
    train, held_out, synthetic = population(rng, 50), population(rng, 50), population(rng, 20)
    ids = ([f"s{i}" for i in range(20)], [f"t{i}" for i in range(50)])
    assert privacy_report("z", synthetic, train, held_out, *ids, n_pairs=1).membership_inference_auc_interval is None
    with_interval = privacy_report("z", synthetic, train, held_out, *ids, n_pairs=1, n_bootstrap=100, seed=1)
    interval = with_interval.membership_inference_auc_interval
    assert interval["ci_low"] <= with_interval.membership_inference_auc <= interval["ci_high"]
    assert interval["n_valid"] == 100


def test_closest_pairs_name_the_training_patient_and_the_held_out_percentile() -> None:
    rng = np.random.default_rng(5)
    train, held_out, synthetic = population(rng, 100), population(rng, 100), population(rng, 10)
    synthetic[7] = train[42] + np.array([0.01, 0.0, 0.0, 0.0])
    report = privacy_report("z", synthetic, train, held_out, [f"s{i}" for i in range(10)],
                            [f"t{i}" for i in range(100)], n_pairs=2)
    first = report.closest_pairs[0]
    assert (first.synthetic_id, first.train_id) == ("s7", "t42")
    assert first.distance == pytest.approx(0.01, rel=1e-6)
    held_out_distance, _ = nearest_neighbours(held_out, train)
    assert first.held_out_percentile == 100.0 * (held_out_distance < 0.01).mean()
    second_distance = np.sort(nearest_neighbours(synthetic, train)[0])[1]
    assert report.closest_pairs[1].distance == pytest.approx(second_distance)
    assert report.held_out_p1 == pytest.approx(np.percentile(held_out_distance, 1.0))
