"""The brain region of a head scan and the density channels a small CNN can learn from (issue 10).

A head CT carries its diagnosis in a few millilitres of brain (a 3 mm bleed, a faint infarct), next to a
skull a thousand HU brighter and air a thousand HU darker. One [0, 1] window over the whole head let
the encoder look at the skull edge (attributions there) and reach chance AUC. What learns (exp10,
``docs/model.md``):

1. **skull strip** at the native grid (:func:`skull_strip`): bone is ``HU > skull_hu``; per axial slice
   the skull ring's holes are filled and the bone removed, the rest eroded by one voxel in-plane (the
   partial-volume rim next to bone);
2. **two-point scanner calibration** (:func:`calibrate_hu`): mean air → −1000 HU and the stripped
   brain's median → ``reference_brain_hu``. A miscalibrated scanner (``HU' = a·HU + b``, the minority
   site) is undone exactly; lesion densities keep their meaning across sites;
3. resample to ``pixdim_mm`` (MONAI ``Spacingd``, bilinear; masks thresholded at 0.5), dropping brain
   voxels that resampling mixed with bone (:data:`MAX_BONE_FRACTION`: thick minority-site slices leak
   bone into the brain otherwise);
4. **crop** ``spatial_size`` around the brain centroid (:func:`crop_around`), zero outside the brain;
5. **channels** (:func:`density_channels`, :data:`IMAGE_CHANNELS`): brain window, hyperdense (blood,
   abscess rim), hypodense (infarct, oedema; CSF excluded), CSF-like, and the brain mask itself. Each
   density channel is a ramp of the brain-only smoothed HU (normalised convolution, so the zeros
   outside the brain do not darken its edge); the hyperdense one is smoothed less (σ 0.5 voxel: small
   bleeds, ICH AUC 0.83 → 0.91).

MR has no physical unit: each scan keeps its per-scan percentile scaling
(:class:`~meddiff.data.transforms.MRPercentileScaled`), the brain is its foreground (BraTS volumes are
already skull-stripped), and it gets the same crop; its density channels are zero (they are HU ramps).

The transforms are MONAI-style dictionary transforms (``__call__(dict) -> dict``, channel-first arrays or
MetaTensors, which keep their affine for the resampling that follows).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from meddiff.config import PreprocessConfig

IMAGE_KEY = "image"
MASK_KEY = "lesion_mask"
BRAIN_KEY = "brain_mask"
BONE_KEY = "bone"

#: the channels of the processed image array (N, C, D, H, W), in order
IMAGE_CHANNELS: tuple[str, ...] = ("brain_window", "hyperdense", "hypodense", "csf", "brain_mask")
BRAIN_MASK_CHANNEL = IMAGE_CHANNELS.index("brain_mask")

#: air is −1000 HU by the definition of the Hounsfield scale: the lower point of the calibration
AIR_HU = -1000.0
#: voxels darker than this are air (no tissue comes near it; the scanner's air is ~ −1000 ± noise)
AIR_THRESHOLD_HU = -500.0
#: fewest brain voxels for a usable median (a failed strip leaves the scan uncalibrated, not wrong)
MIN_BRAIN_VOXELS = 50
#: after resampling, a brain voxel with this much bone in it is dropped (minority-site 8 mm slices
#: otherwise leak bone into the brain rim: p99 336 HU)
MAX_BONE_FRACTION = 0.01
#: masks are resampled bilinearly, then a voxel belongs to the mask when at least half of it does
MASK_THRESHOLD = 0.5
#: the smallest smoothed brain weight the normalised convolution divides by (avoids 0/0 outside)
MIN_SMOOTHING_WEIGHT = 1e-3
#: Gaussian kernels reach this many σ (radius 2 voxels at σ 0.5, 3 at σ 1)
SMOOTHING_TRUNCATE = 3.0


def _in_plane_structure() -> np.ndarray:
    """A 3×3 cross in the axial plane (RAS: the last axis is inferior → superior)."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    return structure


def skull_strip(hu: np.ndarray, skull_hu: float) -> tuple[np.ndarray, np.ndarray]:
    """Brain and bone masks of a head CT volume in HU, ``(X, Y, Z)`` in RAS (axial slices on the last axis).

    Bone is ``hu > skull_hu``; one in-plane closing bridges single-voxel gaps of a thin skull at coarse
    pixels; per axial slice the ring's holes are filled; brain = filled minus bone, eroded by one voxel
    in-plane. Returns ``(brain, bone)`` boolean arrays of ``hu``'s shape (brain empty when no closed
    skull is found).
    """
    bone = hu > skull_hu
    ring = ndimage.binary_closing(bone, _in_plane_structure())
    filled = np.stack([ndimage.binary_fill_holes(ring[..., k]) for k in range(hu.shape[-1])], axis=-1)
    brain = ndimage.binary_erosion(filled & ~ring, _in_plane_structure())
    return brain, bone


def calibrate_hu(hu: np.ndarray, brain: np.ndarray, reference_brain_hu: float) -> np.ndarray:
    """Two-point calibration: mean air → :data:`AIR_HU`, median brain → ``reference_brain_hu``.

    ``HU_cal = AIR_HU + (hu − air) · (reference − AIR_HU) / (median − air)``: a linear scanner distortion
    ``a·HU + b`` maps back exactly. Without air or with fewer than :data:`MIN_BRAIN_VOXELS` brain voxels
    the volume is returned unchanged (float64).
    """
    air_voxels = hu[hu < AIR_THRESHOLD_HU]
    if air_voxels.size == 0 or int(brain.sum()) < MIN_BRAIN_VOXELS:
        return hu.astype(np.float64)
    air, median = float(air_voxels.mean()), float(np.median(hu[brain]))
    if median <= air:
        return hu.astype(np.float64)
    return AIR_HU + (hu.astype(np.float64) - air) * (reference_brain_hu - AIR_HU) / (median - air)


def crop_around(volume: np.ndarray, centre: tuple[float, ...], size: tuple[int, ...]) -> np.ndarray:
    """The ``size`` box of the last ``len(size)`` axes centred on ``centre`` (voxels), zero-padded."""
    spatial = volume.shape[-len(size):]
    out = np.zeros((*volume.shape[: -len(size)], *size), dtype=volume.dtype)
    source, target = [slice(None)] * (volume.ndim - len(size)), [slice(None)] * (volume.ndim - len(size))
    for c, s, n in zip(centre, size, spatial, strict=True):
        low = round(c - (s - 1) / 2)  # the box centre (s - 1) / 2 on the centroid
        a, b = max(low, 0), min(low + s, n)
        if b <= a:  # the box misses the volume on this axis: nothing to copy
            return out
        source.append(slice(a, b))
        target.append(slice(a - low, b - low))
    out[tuple(target)] = volume[tuple(source)]
    return out


def brain_centre(brain: np.ndarray) -> tuple[float, ...]:
    """Centroid (voxels) of ``brain``; the volume's centre when the mask is empty."""
    if not brain.any():
        return tuple((n - 1) / 2.0 for n in brain.shape)
    return tuple(float(c) for c in ndimage.center_of_mass(brain))


def smooth_inside(hu: np.ndarray, brain: np.ndarray, sigma_voxels: float) -> np.ndarray:
    """Gaussian smoothing of ``hu`` within ``brain`` (normalised convolution): ``G(hu·brain) / G(brain)``."""
    weight = brain.astype(np.float64)
    if sigma_voxels <= 0:
        return hu * weight
    numerator = ndimage.gaussian_filter(hu * weight, sigma_voxels, mode="nearest", truncate=SMOOTHING_TRUNCATE)
    denominator = ndimage.gaussian_filter(weight, sigma_voxels, mode="nearest", truncate=SMOOTHING_TRUNCATE)
    return numerator / np.maximum(denominator, MIN_SMOOTHING_WEIGHT)


def ramp(values: np.ndarray, zero_at: float, one_at: float) -> np.ndarray:
    """0 at ``zero_at``, 1 at ``one_at``, linear between, clipped (either direction)."""
    return np.clip((values - zero_at) / (one_at - zero_at), 0.0, 1.0)


def density_channels(hu: np.ndarray, brain: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """(len(IMAGE_CHANNELS), X, Y, Z) float32 model input from calibrated HU and the brain mask.

    brain window ``hu_window`` → [0, 1]; hyperdense ramp of HU smoothed with ``hyperdense_sigma_voxels``;
    hypodense ramp (zero below ``hypodense_floor_hu``: CSF is not an infarct) and CSF ramp of HU smoothed
    with ``density_sigma_voxels``; the brain mask. Everything is zero outside the brain.
    """
    inside = brain.astype(np.float64)
    low, high = config.hu_window
    smooth = smooth_inside(hu, brain, config.density_sigma_voxels)
    smooth_hyper = smooth_inside(hu, brain, config.hyperdense_sigma_voxels)
    channels = {
        "brain_window": ramp(hu, low, high),
        "hyperdense": ramp(smooth_hyper, *config.hyperdense_ramp_hu),
        "hypodense": ramp(smooth, *config.hypodense_ramp_hu) * (smooth > config.hypodense_floor_hu),
        "csf": ramp(smooth, *config.csf_ramp_hu),
        "brain_mask": np.ones_like(inside),
    }
    return np.stack([channels[name] * inside for name in IMAGE_CHANNELS]).astype(np.float32)


def _values(array: Any) -> np.ndarray:
    """Channel 0 of a channel-first array or tensor as float64 numpy."""
    import torch

    data = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    return data[0].astype(np.float64)


def _like(reference: Any, values: np.ndarray) -> Any:
    """``values`` (C, ...) in the container of ``reference``: a MetaTensor keeps its affine and metadata."""
    import torch

    if isinstance(reference, torch.Tensor):
        out = reference.new_zeros((values.shape[0], *reference.shape[1:]), dtype=torch.float32)
        out.copy_(torch.as_tensor(values, dtype=torch.float32))
        return out
    return values.astype(np.float32)


class SkullStripd:
    """CT: add ``brain_mask`` and ``bone`` (1, X, Y, Z) from the image in HU (:func:`skull_strip`)."""

    def __init__(self, skull_hu: float) -> None:
        self.skull_hu = skull_hu

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        out = dict(data)
        brain, bone = skull_strip(_values(data[IMAGE_KEY]), self.skull_hu)
        out[BRAIN_KEY] = _like(data[IMAGE_KEY], brain[None].astype(np.float32))
        out[BONE_KEY] = _like(data[IMAGE_KEY], bone[None].astype(np.float32))
        return out


class ForegroundBraind:
    """MR: ``brain_mask`` = voxels brighter than the scan's mean (BraTS scans are skull-stripped already),
    ``bone`` empty."""

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        out = dict(data)
        values = _values(data[IMAGE_KEY])
        out[BRAIN_KEY] = _like(data[IMAGE_KEY], (values > values.mean())[None].astype(np.float32))
        out[BONE_KEY] = _like(data[IMAGE_KEY], np.zeros((1, *values.shape), dtype=np.float32))
        return out


class ScannerCalibrated:
    """CT: the image through :func:`calibrate_hu` with the brain of :class:`SkullStripd`."""

    def __init__(self, reference_brain_hu: float) -> None:
        self.reference_brain_hu = reference_brain_hu

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        out = dict(data)
        brain = _values(data[BRAIN_KEY]) > MASK_THRESHOLD
        calibrated = calibrate_hu(_values(data[IMAGE_KEY]), brain, self.reference_brain_hu)
        out[IMAGE_KEY] = _like(data[IMAGE_KEY], calibrated[None])
        return out


class BrainCropd:
    """After resampling: threshold the masks, drop bone-mixed brain voxels, crop ``spatial_size`` around the
    brain centroid (zero outside the brain), and write the image as ``channels`` (C, X, Y, Z) float32 numpy:
    :func:`density_channels` for CT; for MR the scan's [0, 1] intensities, zero density channels and the
    brain mask. The lesion mask (if any) becomes (1, X, Y, Z) uint8 inside the brain; ``bone`` is dropped."""

    def __init__(self, config: PreprocessConfig, modality_is_ct: bool) -> None:
        self.config, self.modality_is_ct = config, modality_is_ct

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in data.items() if k not in (BONE_KEY, BRAIN_KEY)}
        size = tuple(self.config.spatial_size)
        brain = (_values(data[BRAIN_KEY]) >= MASK_THRESHOLD) & (_values(data[BONE_KEY]) < MAX_BONE_FRACTION)
        centre = brain_centre(brain)
        brain = crop_around(brain, centre, size)
        image = crop_around(_values(data[IMAGE_KEY]), centre, size)
        if self.modality_is_ct:
            out[IMAGE_KEY] = density_channels(image, brain, self.config)
        else:
            channels = np.zeros((len(IMAGE_CHANNELS), *size), dtype=np.float32)
            channels[IMAGE_CHANNELS.index("brain_window")] = image * brain
            channels[BRAIN_MASK_CHANNEL] = brain
            out[IMAGE_KEY] = channels
        if MASK_KEY in data:
            lesion = crop_around(_values(data[MASK_KEY]) >= MASK_THRESHOLD, centre, size) & brain
            out[MASK_KEY] = lesion[None].astype(np.uint8)
        return out
