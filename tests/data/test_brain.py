"""The brain region and its channels (issue 10): skull strip, scanner calibration, crop, density channels,
and the whole MONAI pipeline on a NIfTI phantom."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from meddiff.config import PreprocessConfig
from meddiff.data.brain import (
    BRAIN_MASK_CHANNEL,
    IMAGE_CHANNELS,
    brain_centre,
    calibrate_hu,
    crop_around,
    density_channels,
    skull_strip,
)
from meddiff.data.synthetic_anatomy import head_volume, voxel_centres

SPACING = (4.0, 4.0, 6.0)
SHAPE = (48, 48, 24)


def _phantom(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic head in HU (no noise) and its true brain mask, RAS-ordered like the interim NIfTI."""
    rng = np.random.default_rng(seed)
    volume, brain, _, _ = head_volume(rng, voxel_centres(SHAPE, SPACING), age_years=60.0)
    return volume, brain


def test_skull_strip_keeps_the_brain_and_removes_bone() -> None:
    hu, true_brain = _phantom()
    brain, bone = skull_strip(hu, skull_hu=250.0)
    assert not (brain & (hu > 250.0)).any(), "no bone voxel in the brain"
    assert not (brain & (hu < -500.0)).any(), "no air in the brain"
    assert (brain & ~true_brain).sum() == 0, "nothing outside the true brain"
    # the one-voxel in-plane erosion costs the rim only: most of the brain stays
    assert (brain & true_brain).sum() / true_brain.sum() > 0.75
    assert bone.sum() == (hu > 250.0).sum()


def test_calibration_maps_a_linear_scanner_distortion_back() -> None:
    hu, _ = _phantom()
    brain, _ = skull_strip(hu, skull_hu=250.0)
    reference = float(np.median(hu[brain]))
    distorted = 1.08 * hu + 6.0  # the minority site's scanner
    restored = calibrate_hu(distorted, brain, reference_brain_hu=reference)
    np.testing.assert_allclose(restored, hu, atol=1e-6)
    # the calibrated brain median is the reference, air is -1000
    assert np.median(restored[brain]) == pytest.approx(reference)
    assert restored[hu < -500].mean() == pytest.approx(-1000.0)


def test_calibration_leaves_a_scan_without_brain_unchanged() -> None:
    hu = np.full((8, 8, 4), -1000.0)
    np.testing.assert_array_equal(calibrate_hu(hu, np.zeros(hu.shape, bool), 32.0), hu)


def test_crop_is_centred_on_the_brain() -> None:
    mask = np.zeros((60, 50, 30), dtype=bool)
    mask[30:44, 10:30, 5:15] = True  # off-centre block, centroid (36.5, 19.5, 9.5)
    centre = brain_centre(mask)
    assert centre == pytest.approx((36.5, 19.5, 9.5))
    cropped = crop_around(mask, centre, (20, 24, 12))
    assert cropped.sum() == mask.sum(), "the whole brain fits in the box"
    np.testing.assert_allclose(brain_centre(cropped), [(n - 1) / 2 for n in (20, 24, 12)], atol=0.5)


def test_crop_pads_with_zeros_outside_the_volume() -> None:
    volume = np.ones((1, 4, 4, 4), dtype=np.float32)
    cropped = crop_around(volume, (0.0, 0.0, 0.0), (4, 4, 4))
    assert cropped.shape == (1, 4, 4, 4)
    assert cropped.sum() == 2 * 2 * 2 and cropped[0, 2:, 2:, 2:].all()


def test_density_channels_light_up_their_lesions_only() -> None:
    config = PreprocessConfig()
    hu = np.full((20, 20, 12), 32.0)
    brain = np.zeros(hu.shape, dtype=bool)
    brain[2:18, 2:18, 1:11] = True
    hu[5:8, 5:8, 4:7] = 70.0  # bleed
    hu[11:16, 11:16, 4:9] = 18.0  # infarct
    hu[2:4, 14:18, 1:11] = 4.0  # CSF
    channels = density_channels(np.where(brain, hu, 0.0), brain, config)
    assert channels.shape == (len(IMAGE_CHANNELS), *hu.shape) and channels.dtype == np.float32
    named = dict(zip(IMAGE_CHANNELS, channels, strict=True))
    assert named["hyperdense"][6, 6, 5] > 0.9 and named["hyperdense"][13, 13, 6] == 0.0
    assert named["hypodense"][13, 13, 6] > 0.7 and named["hypodense"][6, 6, 5] == 0.0
    assert named["hypodense"][2, 16, 5] == 0.0, "CSF is not an infarct"
    assert named["csf"][2, 16, 5] > 0.5 and named["csf"][10, 3, 5] == 0.0
    assert named["brain_window"][10, 10, 2] == pytest.approx(32.0 / 80.0)
    np.testing.assert_array_equal(named["brain_mask"], brain)
    assert not channels[:, ~brain].any(), "zero outside the brain"
    for name in ("hyperdense", "hypodense", "csf"):  # normal brain lights none of the lesion channels
        assert named[name][9, 14, 2] == 0.0, name


def test_the_monai_pipeline_strips_crops_and_keeps_the_lesion_aligned(tmp_path: Path) -> None:
    from meddiff.data.transforms import IMAGE_KEY, MASK_KEY, image_transforms

    hu, true_brain = _phantom(1)
    lesion = np.zeros(hu.shape, dtype=np.uint8)
    inside = np.round(brain_centre(true_brain)).astype(int) + np.array([6, 0, 0])  # well inside, off the centre
    block = tuple(slice(int(c) - 1, int(c) + 2) for c in inside)
    hu[block] = 70.0
    lesion[block] = 1
    affine = np.diag([*SPACING, 1.0])
    nib.save(nib.Nifti1Image(hu.astype(np.float32), affine), tmp_path / "image.nii.gz")
    nib.save(nib.Nifti1Image(lesion, affine), tmp_path / "mask.nii.gz")
    config = PreprocessConfig(spatial_size=(36, 44, 24), pixdim_mm=SPACING)
    out = image_transforms(config)({IMAGE_KEY: str(tmp_path / "image.nii.gz"), MASK_KEY: str(tmp_path / "mask.nii.gz")})
    image, mask = np.asarray(out[IMAGE_KEY]), np.asarray(out[MASK_KEY])
    assert image.shape == (len(IMAGE_CHANNELS), 36, 44, 24) and mask.shape == (1, 36, 44, 24)
    brain = image[BRAIN_MASK_CHANNEL] > 0.5
    assert 0.75 < brain.sum() / true_brain.sum() <= 1.0
    np.testing.assert_allclose(brain_centre(brain), [17.5, 21.5, 11.5], atol=1.0)
    assert mask.sum() == lesion.sum(), "same grid: every lesion voxel kept"
    hyperdense = image[IMAGE_CHANNELS.index("hyperdense")]
    assert hyperdense[mask[0] > 0].min() > 0.5 and hyperdense[brain & (mask[0] == 0)].mean() < 0.05
