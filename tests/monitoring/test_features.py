"""The per-patient statistics monitoring compares: exact values on constructed patients."""

from __future__ import annotations

import numpy as np
import pytest

from meddiff.data.brain import IMAGE_CHANNELS
from meddiff.data.dataset import ProcessedDataset
from meddiff.monitoring.features import LatentProjection, ehr_features, image_features, note_features


def _data(n: int = 3) -> ProcessedDataset:
    channels = len(IMAGE_CHANNELS)
    image = np.zeros((n, channels, 4, 4, 4), dtype=np.float16)
    image[:, -1, :2] = 1.0  # brain mask: half the crop
    image[:, 0, :2] = 0.5   # brain window inside the brain
    image[:, 0, 2:] = 0.9   # outside the brain: must not count
    arrays = {
        "tabular": np.array([[1.0, -1.0], [0.0, 0.5], [2.0, 0.0]], dtype=np.float32)[:n],
        "tabular_missing": np.array([[False, True], [False, False], [False, False]])[:n],
        # [CLS]=2 w w [UNK]=1 [SEP]=3 [PAD]=0
        "token_ids": np.tile(np.array([2, 7, 8, 1, 3, 0], dtype=np.int32), (n, 1)),
        "token_mask": np.tile(np.array([1, 1, 1, 1, 1, 0], dtype=bool), (n, 1)),
        "image": image,
        "modality_present": np.array([[True, True, True], [False, True, True], [True, False, False]])[:n],
        "label": np.zeros(n, dtype=np.int64),
    }
    meta = {"tabular_features": [{"name": "crp", "mean": 10.0, "std": 5.0}, {"name": "age", "mean": 60.0, "std": 20.0}],
            "image_channels": list(IMAGE_CHANNELS)}
    return ProcessedDataset(arrays, meta)


def test_ehr_features_undo_the_standardisation_and_keep_missing_as_nan() -> None:
    table = ehr_features(_data(), np.arange(3))
    assert list(table.columns) == ["crp", "age"]
    assert len(table) == 2  # the third patient has no EHR
    assert table["crp"].tolist() == [15.0, 10.0]
    assert np.isnan(table["age"].iloc[0]) and table["age"].iloc[1] == 70.0


def test_note_features_count_words_and_unknown_share() -> None:
    table = note_features(_data(), np.arange(3))
    assert len(table) == 2  # patient 3 has no note
    assert table["note_tokens"].tolist() == [3.0, 3.0]  # w, w, [UNK]; not [CLS]/[SEP]/[PAD]
    assert table["unknown_token_share"].tolist() == pytest.approx([1 / 3, 1 / 3])


def test_image_features_measure_inside_the_brain_only() -> None:
    table = image_features(_data(), np.arange(3))
    assert len(table) == 2  # patient 2 has no image
    assert table["brain_share"].tolist() == [0.5, 0.5]
    assert table["brain_window_mean"].tolist() == [0.5, 0.5]
    assert table["brain_window_std"].tolist() == [0.0, 0.0]


def test_latent_projection_recovers_the_dominant_axis_and_masks_absent_modalities() -> None:
    rng = np.random.default_rng(0)
    latents = rng.normal(scale=0.01, size=(50, 3, 4))
    latents[:, 0, 2] += rng.normal(scale=3.0, size=50)  # image latent varies along axis 2
    present = np.ones((50, 3), dtype=bool)
    present[:5, 0] = False
    projection = LatentProjection.fit(latents, present, n_components=2)
    assert abs(projection.components["image"][0, 2]) == pytest.approx(1.0, abs=1e-3)
    table = projection.transform(latents, present)
    assert table["latent_image_pc1"].isna().sum() == 5
    assert {"latent_text_pc1", "latent_tabular_pc2"} <= set(table.columns)
