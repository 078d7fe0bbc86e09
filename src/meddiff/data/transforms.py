"""MONAI dictionary transforms that turn an interim NIfTI image and its lesion mask into model input.

The pipeline reads as its steps: load (NibabelReader) → channel first → RAS orientation → brain mask and
intensities at the native grid → resample to ``pixdim_mm`` (bilinear; masks thresholded afterwards) →
crop ``spatial_size`` around the brain → the channels of :data:`~meddiff.data.brain.IMAGE_CHANNELS` →
tensors. Intensities depend on the modality: CT is in Hounsfield units, so the head is skull-stripped and
calibrated to air and brain (:mod:`.brain`) and split into density channels; MR intensities have no
physical unit and differ from scan to scan, so each MR scan is scaled by its own percentiles within the
body (:class:`MRPercentileScaled`: the voxels brighter than the scan's mean, the usual foreground estimate
for MR). MONAI is imported inside the functions (``import monai`` takes seconds).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from meddiff.config import PreprocessConfig
from meddiff.data.brain import (
    BONE_KEY,
    BRAIN_KEY,
    IMAGE_KEY,
    MASK_KEY,
    BrainCropd,
    ForegroundBraind,
    ScannerCalibrated,
    SkullStripd,
)

__all__ = ["CT", "IMAGE_KEY", "MASK_KEY", "MR", "MRPercentileScaled", "image_transforms", "quiet_monai_import"]

CT, MR = "CT", "MR"
#: MR: the body percentiles mapped to 0 and 1 (robust to the few hottest and darkest voxels)
MR_LOWER_PERCENTILE = 0.5
MR_UPPER_PERCENTILE = 99.5


class MRPercentileScaled:
    """MONAI-style dictionary transform: ``(x - p_low) / (p_high - p_low)`` clipped to [0, 1], with the
    percentiles taken over the body (voxels above the scan's mean intensity); a scan without contrast
    (every voxel equal) becomes zeros. Works on numpy arrays and torch tensors, channel first."""

    def __init__(self, key: str, lower: float = MR_LOWER_PERCENTILE, upper: float = MR_UPPER_PERCENTILE) -> None:
        self.key, self.lower, self.upper = key, lower, upper

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        import numpy as np
        import torch

        out = dict(data)
        image = out[self.key]
        values = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image, dtype=np.float32)
        body = values[values > values.mean()]
        if body.size == 0:
            scaled = np.zeros_like(values)
        else:
            low, high = np.percentile(body, [self.lower, self.upper])
            scaled = np.clip((values - low) / (high - low), 0.0, 1.0) if high > low else np.zeros_like(values)
        if isinstance(image, torch.Tensor):  # a MetaTensor keeps its affine and metadata
            result = image.clone().float()
            result.copy_(torch.as_tensor(scaled))
            out[self.key] = result
        else:
            out[self.key] = scaled.astype(np.float32)
        return out


def quiet_monai_import() -> None:
    """MONAI 1.6 announces at import that the (GPU-only) nvImageCodec DICOM plug-in is absent; we read
    DICOM with pydicom ourselves, so that notice is noise."""
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")


def image_transforms(config: PreprocessConfig, with_mask: bool = True, modality: str = CT) -> Any:
    """A ``monai.transforms.Compose`` over ``{"image": path[, "lesion_mask": path]}`` giving ``image``
    (C, *spatial_size) float32 channels (:data:`~meddiff.data.brain.IMAGE_CHANNELS`) and ``lesion_mask``
    (1, *spatial_size) uint8.

    ``modality`` ``CT``: skull strip, scanner calibration, density channels (:mod:`.brain`); ``MR``: each
    scan scaled by its own body percentiles, its foreground as the brain. ``ValueError`` for any other
    modality.
    """
    if modality not in (CT, MR):
        raise ValueError(f"no intensity scaling for modality {modality!r} (expected {CT} or {MR})")
    quiet_monai_import()
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        EnsureTyped,
        Lambda,
        LoadImaged,
        Orientationd,
        Spacingd,
    )

    keys = [IMAGE_KEY, MASK_KEY] if with_mask else [IMAGE_KEY]
    # our dictionary transforms go in as monai Lambda: a PersistentDataset caches the output of the leading
    # deterministic monai Transforms only, so a plain callable would end the cached part (and the rest
    # would rerun on every load, on tensors that lost their affine)
    intensity = [Lambda(step) for step in (
        [SkullStripd(config.skull_hu), ScannerCalibrated(config.reference_brain_hu)] if modality == CT
        else [MRPercentileScaled(IMAGE_KEY), ForegroundBraind()])]
    resampled = [*keys, BRAIN_KEY, BONE_KEY]
    return Compose([
        LoadImaged(keys=keys, reader="NibabelReader", image_only=True),
        EnsureChannelFirstd(keys=keys),
        Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        *intensity,
        # masks too: bilinear, then thresholded by BrainCropd (a mask voxel is one when half of it is)
        Spacingd(keys=resampled, pixdim=config.pixdim_mm, mode="bilinear"),
        Lambda(BrainCropd(config, modality_is_ct=modality == CT)),
        # plain tensors (no MetaTensor): what a PersistentDataset can reload with torch.load(weights_only=True)
        EnsureTyped(keys=keys, data_type="tensor", track_meta=False),
    ])
