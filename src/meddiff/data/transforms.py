"""MONAI dictionary transforms that turn an interim NIfTI CT (HU) and its lesion mask into model input.

The pipeline reads as its steps: load (NibabelReader) → channel first → RAS orientation → resample to
``pixdim_mm`` (bilinear image, nearest mask) → HU window to [0, 1], clipped → pad/crop to
``spatial_size`` → tensors. MONAI is imported inside the functions (``import monai`` takes seconds).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from meddiff.config import PreprocessConfig

IMAGE_KEY = "image"
MASK_KEY = "lesion_mask"


def quiet_monai_import() -> None:
    """MONAI 1.6 announces at import that the (GPU-only) nvImageCodec DICOM plug-in is absent; we read
    DICOM with pydicom ourselves, so that notice is noise."""
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")


def image_transforms(config: PreprocessConfig, with_mask: bool = True) -> Any:
    """A ``monai.transforms.Compose`` over ``{"image": path[, "lesion_mask": path]}``."""
    quiet_monai_import()
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        EnsureTyped,
        LoadImaged,
        Orientationd,
        ResizeWithPadOrCropd,
        ScaleIntensityRanged,
        Spacingd,
    )

    keys = [IMAGE_KEY, MASK_KEY] if with_mask else [IMAGE_KEY]
    modes = ("bilinear", "nearest") if with_mask else ("bilinear",)
    low, high = config.hu_window
    return Compose([
        LoadImaged(keys=keys, reader="NibabelReader", image_only=True),
        EnsureChannelFirstd(keys=keys),
        Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys=keys, pixdim=config.pixdim_mm, mode=modes),
        ScaleIntensityRanged(keys=IMAGE_KEY, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True),
        ResizeWithPadOrCropd(keys=keys, spatial_size=config.spatial_size),
        # plain tensors (no MetaTensor): what a PersistentDataset can reload with torch.load(weights_only=True)
        EnsureTyped(keys=keys, data_type="tensor", track_meta=False),
    ])
