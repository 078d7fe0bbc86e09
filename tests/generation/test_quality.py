"""Quality measures on constructed cases whose answers are known: Fréchet distance, improved precision/recall
(Kynkäänniemi et al. 2019) and the 2.5-D FID with the project's encoder and a user TorchScript checkpoint."""

from pathlib import Path

import numpy as np
import pytest
import torch

from meddiff.generation.quality import (
    PLANE_AXES,
    checkpoint_slice_features,
    encoder_feature_map,
    encoder_slice_features,
    fid_25d,
    frechet_distance,
    load_checkpoint,
    precision_recall,
)
from meddiff.model.encoders import ImageEncoder


def test_frechet_distance_of_a_shifted_copy_is_the_squared_shift() -> None:
    a = np.random.default_rng(0).normal(size=(200, 4))
    shift = np.array([1.0, -2.0, 0.0, 0.5])
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a + shift, a) == pytest.approx(float((shift**2).sum()), rel=1e-6)


def test_precision_recall_of_a_copy_a_far_set_and_a_collapsed_set() -> None:
    real = np.random.default_rng(1).normal(size=(60, 3))
    assert precision_recall(real, real.copy(), k=3) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0, k=3) == (0.0, 0.0)
    # mode collapse: every synthetic sample sits on one real patient → all realistic, almost nothing covered
    collapsed = real[:1] + np.random.default_rng(2).normal(scale=1e-6, size=(60, 3))
    precision, recall = precision_recall(real, collapsed, k=3)
    assert precision == 1.0 and recall == pytest.approx(1 / 60)


def test_precision_recall_of_an_independent_sample_is_high_but_below_one() -> None:
    rng = np.random.default_rng(3)
    precision, recall = precision_recall(rng.normal(size=(300, 2)), rng.normal(size=(300, 2)), k=3)
    assert 0.85 < precision < 1.0 and 0.85 < recall < 1.0


def test_precision_recall_needs_more_than_k_samples() -> None:
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)), k=3)


def _encoder() -> ImageEncoder:
    torch.manual_seed(0)
    return ImageEncoder(in_channels=2, channels=[4, 8], d_model=16, spatial_size=(8, 12, 4), dropout=0.0,
                        brain_channel=1)


def _volumes(n: int, seed: int) -> np.ndarray:
    volumes = np.random.default_rng(seed).random((n, 2, 8, 12, 4)).astype(np.float32)
    volumes[:, 1] = 1.0  # brain mask
    return volumes


def test_encoder_slice_features_average_the_deepest_map_over_each_plane() -> None:
    encoder, volumes = _encoder(), _volumes(3, 0)
    deepest = encoder_feature_map(encoder.eval(), torch.from_numpy(volumes)).numpy()  # (3, 8, 4, 6, 2)
    soft = volumes.copy()
    soft[:, 1] = 0.4  # a decoded, soft brain channel below the forward pass's 0.5 gate: content still counts
    soft_maps = encoder_feature_map(encoder, torch.from_numpy(soft)).numpy()
    assert not np.allclose(soft_maps[0], soft_maps[1])
    features = encoder_slice_features(encoder)
    axial = features(volumes, PLANE_AXES["axial"])
    assert axial.shape == (3 * deepest.shape[4], deepest.shape[1])
    np.testing.assert_allclose(axial[1], deepest[0, :, :, :, 1].mean(axis=(1, 2)), rtol=1e-5)
    sagittal = features(volumes, PLANE_AXES["sagittal"])
    np.testing.assert_allclose(sagittal[deepest.shape[2]], deepest[1, :, 0].mean(axis=(1, 2)), rtol=1e-5)


class _SliceNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))  # (N, 5, H, W): spatial axes averaged by the caller


def test_checkpoint_fid_is_zero_for_the_same_volumes_and_grows_with_a_shift(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "slice_net.pt"
    torch.jit.save(torch.jit.script(_SliceNet()), str(path))
    features = checkpoint_slice_features(load_checkpoint(path), channel=0)
    real, floor = _volumes(6, 1), _volumes(6, 2)
    assert features(real, PLANE_AXES["coronal"]).shape == (6 * 12, 5)
    brighter = real.copy()
    brighter[:, 0] = np.clip(brighter[:, 0] + 0.5, 0, 1)
    report = fid_25d(features, [real, brighter], real, floor)
    assert set(report) == set(PLANE_AXES)
    for plane in report.values():
        assert plane["fid_range"][0] == pytest.approx(0.0, abs=1e-6)
        assert plane["fid_range"][1] > plane["real_floor"] > 0.0
        assert plane["fid"] == pytest.approx(plane["fid_range"][1] / 2, rel=1e-6)


def test_a_missing_checkpoint_is_an_error_not_a_download(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no TorchScript file"):
        load_checkpoint(tmp_path / "radimagenet.pt")


def test_the_data_card_says_when_precision_recall_could_not_be_measured() -> None:
    from meddiff.generation.data_card import data_card

    spread = {"mean": 1.0, "min": 0.5, "max": 1.5}
    metrics = {
        "n_per_class": {"a": 2}, "n_synthetic": 2, "class_agreement": 1.0, "class_agreement_per_class": {"a": 1.0},
        "class_agreement_real_per_class": {"a": None}, "frechet_distance_draws": {**spread, "n_draws": 2, "size": 3},
        "frechet_distance_real_floor": 2.0, "frechet_distance_class_balanced": 3.0, "mmd": 0.1, "mmd_real_floor": 0.0,
        "precision_recall": {"k": 3, "not_measured": "too few patients"}, "privacy": {},
        "export": {"n_dicom_files": 0, "resources": {}, "n_lab_values_clipped": 0},
        "tstr": {"classifier": "lr", "n_test": 3, "n_synthetic_train": 2, "n_real_train": 3,
                 **{key: {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0}
                    for key in ("tstr_auc_macro", "trtr_auc_macro", "tstr_over_trtr")}},
    }
    card = data_card(metrics, {}, {})
    assert "| precision/recall, fused latent z (k = 3) | not measured: too few patients | — |" in card
    assert "| class agreement, a | 1.000 | — |" in card
    assert "| 1.00 [0.50, 1.50] | 2.00 |" in card
