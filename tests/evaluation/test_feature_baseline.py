"""The hand-made-feature logistic regression (issue 10): its features mean what they say, it learns a
density difference, C is chosen on validation, and it is a suite variant."""

from __future__ import annotations

import numpy as np
import pytest

from meddiff.data.brain import BRAIN_MASK_CHANNEL, IMAGE_CHANNELS
from meddiff.data.dataset import ProcessedDataset
from meddiff.evaluation.claims import Estimate, claims_table
from meddiff.evaluation.feature_baseline import C_GRID, fit_feature_baseline, image_features
from meddiff.evaluation.suite import IMAGE_VS_FEATURES, _needed, render_summary

WINDOW = (0.0, 80.0)
SHAPE = (12, 12, 8)


def _image(hu: np.ndarray) -> np.ndarray:
    """(C, *SHAPE) processed channels of an HU volume inside a box-shaped brain (only the window and mask
    channels matter to the features)."""
    brain = np.zeros(SHAPE, dtype=bool)
    brain[1:-1, 1:-1, 1:-1] = True
    image = np.zeros((len(IMAGE_CHANNELS), *SHAPE), dtype=np.float32)
    image[IMAGE_CHANNELS.index("brain_window")] = np.clip((hu - WINDOW[0]) / (WINDOW[1] - WINDOW[0]), 0, 1) * brain
    image[BRAIN_MASK_CHANNEL] = brain
    return image


def _dataset(n: int = 90, seed: int = 0) -> ProcessedDataset:
    """Class 1 has a bleed (70 HU block) in otherwise uniform 30 HU brain; 10 % have no image."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = []
    for label in labels:
        hu = 30.0 + rng.normal(0.0, 2.0, SHAPE)
        if label:
            x, y = rng.integers(2, 8, size=2)
            hu[x : x + 3, y : y + 3, 3:6] = 70.0
        images.append(_image(hu))
    present = np.ones((n, 3), dtype=bool)
    present[::10, 0] = False
    image = np.stack(images).astype(np.float16)
    image[~present[:, 0]] = 0
    split = np.array(["train", "train", "val", "test", "train", "val"] * (n // 6))
    return ProcessedDataset({"image": image, "label": labels, "split": split, "modality_present": present},
                            {"class_names": ["healthy", "bleed"], "hu_window": list(WINDOW)})


def test_features_count_what_they_name() -> None:
    hu = np.full(SHAPE, 30.0)
    hu[3:6, 3:6, 3:6] = 70.0  # 27 bleed voxels
    bleed = image_features(_image(hu)[None], WINDOW)[0]
    plain = image_features(_image(np.full(SHAPE, 30.0))[None], WINDOW)[0]
    # histogram (8), max, min above CSF, counts > 45/50/60, two hypodense bands, CSF fraction
    assert bleed.shape == plain.shape == (8 + 2 + 3 + 2 + 1,)
    assert np.expm1(plain[8]) == pytest.approx(30.0) and np.expm1(bleed[8]) > 50.0  # smoothed bleed maximum
    assert np.expm1(plain[10:13]).sum() == 0 and np.expm1(bleed[10]) >= 8  # smoothed bleed core above 45 HU
    assert plain[-1] == 0.0, "no CSF in a 30 HU brain"


def test_an_absent_image_gives_zero_features_and_a_wrong_layout_is_refused() -> None:
    assert not image_features(np.zeros((1, len(IMAGE_CHANNELS), *SHAPE)), WINDOW).any()
    with pytest.raises(ValueError, match="expected"):
        image_features(np.zeros((1, 1, *SHAPE)), WINDOW)


def test_the_baseline_learns_a_density_difference_and_keeps_the_prior_without_image() -> None:
    data = _dataset()
    model = fit_feature_baseline(data, seed=0)
    assert model.c in C_GRID and model.val_auc > 0.95
    test = data.indices("test")
    probs = model.predict_proba(data, test, data.arrays["modality_present"][test])
    has_image = data.arrays["modality_present"][test, 0]
    labels = data.arrays["label"][test]
    assert (probs[has_image & (labels == 1), 1] > 0.5).all() and (probs[has_image & (labels == 0), 1] < 0.5).all()
    np.testing.assert_allclose(probs[~has_image], np.tile(model.prior, ((~has_image).sum(), 1)))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)


def test_feature_lr_is_a_suite_variant_that_trains_nothing() -> None:
    assert _needed(["feature_lr"]) == []
    rows = claims_table({IMAGE_VS_FEATURES.key: Estimate(-0.05, -0.09, -0.01)}, (IMAGE_VS_FEATURES,))
    summary = render_summary(rows, [], [], 5, 3)
    assert "image_only − feature_lr (paired) | -0.050 [-0.090, -0.010] | **not supported** |" in summary
