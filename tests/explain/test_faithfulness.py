import numpy as np

from meddiff import MODALITIES
from meddiff.explain.deletion import RANDOM, curve_area, deletion_counts, patient_curves
from meddiff.explain.faithfulness import modality_deletion, share_agreement
from meddiff.model.calibration import calibrated, fit_temperature

from .block_model import SPATIAL, BlockModel, block_mask, block_patients


def test_share_agreement_on_constructed_shares() -> None:
    same_order = np.array([[0.6, 0.3, 0.1], [0.1, 0.3, 0.6], [0.9, 0.0, 0.1]])
    drops = 0.5 * same_order
    drops[2, 1] = np.nan  # patient 2 has no note
    agreement = share_agreement(same_order, drops)
    assert agreement["spearman_per_patient"] == 1.0 and agreement["n_patients_ranked"] == 3
    assert agreement["top_agreement"] == 1.0 and agreement["n_pairs"] == 8
    assert np.isclose(agreement["spearman_pooled"], 1.0)
    drops = np.array([[0.30, 0.10, 0.00], [0.05, 0.20, 0.40], [0.10, np.nan, 0.02]])
    reversed_order = np.array([[0.1, 0.3, 0.6], [0.6, 0.3, 0.1], [0.1, 0.0, 0.9]])
    against = share_agreement(reversed_order, drops)
    assert against["spearman_per_patient"] == -1.0 and against["top_agreement"] == 0.0
    assert against["spearman_pooled"] < 0


def test_deleting_the_modality_the_model_reads() -> None:
    model = BlockModel(image_weight=0.0, tabular_weight=3.0, bias=3.0)
    inputs, present = block_patients()
    present[2, MODALITIES.index("text")] = False
    drops = modality_deletion(model, inputs, present, np.ones(3, int))
    assert (drops[:, MODALITIES.index("tabular")] > 0.5).all()
    np.testing.assert_allclose(drops[:, MODALITIES.index("image")], 0.0, atol=1e-7)
    assert np.isnan(drops[2, MODALITIES.index("text")])


def test_curve_area_and_counts() -> None:
    assert curve_area(np.array([1.0, 0.5, 0.0])) == 0.5
    assert curve_area(np.array([1.0, 0.0, 0.0])) == 0.25
    assert deletion_counts(10, [0.0, 0.01, 0.25, 1.0]) == [0, 1, 3, 10]


def test_a_perfect_map_deletes_faster_than_random() -> None:
    model = BlockModel(bias=12.0)  # p(class 1) ≈ 0.998 with the block, ≈ 0 once it is gone
    inputs, present = block_patients(n=1)
    perfect = {"image": block_mask().numpy().astype(float), "text": np.zeros(6), "tabular": np.zeros(4)}
    fractions = [0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
    curves = patient_curves(model, inputs, present, 0, {"perfect": perfect}, 1, np.ones(SPATIAL, bool), fractions,
                            np.random.default_rng(0))
    assert set(curves) == {"perfect", RANDOM}
    ranked, randomised = curves["perfect"]["image"], curves[RANDOM]["image"]
    # 960 voxels: 1 % = 10 voxels of the 8-voxel block are gone at step 2, the probability with them
    assert ranked[0] > 0.99 and ranked[2] < 0.01
    assert randomised[2] > 0.9  # ten random voxels rarely hit the block
    assert curve_area(ranked) < curve_area(randomised) - 0.3
    # the note and the EHR do not matter: their curves are flat
    for modality in ("text", "tabular"):
        np.testing.assert_allclose(curves["perfect"][modality], ranked[0], rtol=1e-6)
        np.testing.assert_allclose(curves[RANDOM][modality], ranked[0], rtol=1e-6)


def test_temperature_scaling_recovers_the_temperature() -> None:
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, size=(4000, 3))
    labels = np.array([rng.choice(3, p=p) for p in calibrated(true_logits, 1.0)])
    temperature = fit_temperature(3.0 * true_logits, labels)
    assert abs(temperature - 3.0) < 0.3
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, int)) == 1.0
    np.testing.assert_allclose(calibrated(true_logits, 1.0).sum(axis=1), 1.0)
    assert (calibrated(true_logits, 2.0).argmax(1) == true_logits.argmax(1)).all()

