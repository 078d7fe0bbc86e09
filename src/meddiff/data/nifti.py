"""NIfTI imaging in the BraTS layouts, as the challenges ship them:

* BraTS 2021 and earlier: ``imaging/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz`` (``BraTS2021_00001``);
* BraTS 2023: ``imaging/<case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz`` (``BraTS-GLI-00012-000``), read as
  t1n = t1, t1c = t1ce, t2w = t2, t2f = flair.

The BraTS challenge (Menze et al., IEEE TMI 2015; Baid et al., arXiv:2107.02314) ships co-registered
MR channels and a tumour segmentation per case (labels 1 necrotic core, 2 oedema, 4 enhancing; 3 in
BraTS 2023). ``ingest`` takes one channel (``ingest.brats_channel``) as the patient's image, the
segmentation (any label > 0) as the lesion mask, and the case name as the patient id. All five files
must be present with one shape and one affine. Trailing singleton axes (``(X, Y, Z, 1)``, 3-D data in a
4-D container as ITK-based tools write it) are dropped; NaN in the image channel (the background of
skull-stripping and registration tools) is read as 0; infinite values reject the case.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

CHANNELS: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
SEGMENTATION = "seg"
#: BraTS 2023 file suffixes -> the channel names used here
BRATS_2023_ROLES: dict[str, str] = {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair", "seg": SEGMENTATION}
#: separators between the case id and the role: ``_`` (BraTS 2021) and ``-`` (BraTS 2023)
ROLE_SEPARATORS: tuple[str, ...] = ("_", "-")
SPATIAL_DIMS = 3
SEG_LABELS: frozenset[int] = frozenset({0, 1, 2, 3, 4})
NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")


class CaseError(Exception):
    """A BraTS case that is rejected: ``reason`` is the quarantine code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class NiftiCase:
    """One case: the chosen channel (float32), the binary lesion mask (uint8), their affine."""

    case_id: str
    image: np.ndarray
    mask: np.ndarray
    affine: np.ndarray


def is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def _role(case_id: str, path: Path) -> str | None:
    """The channel a file of case ``case_id`` holds (BraTS 2021 or 2023 naming), or ``None``."""
    stem = path.name.removesuffix(".gz").removesuffix(".nii")
    for separator in ROLE_SEPARATORS:
        prefix = f"{case_id}{separator}"
        if stem.startswith(prefix):
            role = stem[len(prefix):]
            if role in (*CHANNELS, SEGMENTATION):
                return role
            if role in BRATS_2023_ROLES:
                return BRATS_2023_ROLES[role]
    return None


def _squeezed(image: nib.Nifti1Image) -> nib.Nifti1Image:
    """Drop singleton axes after the third (3-D data in a 4-D container)."""
    while len(image.shape) > SPATIAL_DIMS and image.shape[-1] == 1:
        image = nib.squeeze_image(image)
    return image


def load_brats_case(case_id: str, files: list[Path], channel: str) -> NiftiCase:
    """Check and read one case; raise :class:`CaseError` with a reason code."""
    roles: dict[str, Path] = {}
    for path in files:
        role = _role(case_id, path)
        if role is None:
            raise CaseError("unexpected_file", f"{path.name}: expected {case_id}_<t1|t1ce|t2|flair|seg>.nii.gz "
                            f"(BraTS 2021) or {case_id}-<t1n|t1c|t2w|t2f|seg>.nii.gz (BraTS 2023)")
        if role in roles:
            raise CaseError("unexpected_file", f"{path.name} and {roles[role].name} are both the {role} of {case_id}")
        roles[role] = path
    missing = [r for r in (*CHANNELS, SEGMENTATION) if r not in roles]
    if missing:
        raise CaseError("incomplete_case", f"case {case_id} lacks {', '.join(missing)}")
    images = {}
    for role, path in roles.items():
        try:
            images[role] = _squeezed(nib.load(path))
            images[role].get_fdata(dtype=np.float32) if role in (channel, SEGMENTATION) else None
        except Exception as error:
            raise CaseError("unreadable_image", f"{path.name}: {type(error).__name__}: {error}") from None
    reference = images[channel]
    for role, image in images.items():
        if image.shape != reference.shape or not np.allclose(image.affine, reference.affine, atol=1e-3):
            raise CaseError("geometry_mismatch", f"{roles[role].name}: shape {image.shape} / affine differ from "
                            f"{roles[channel].name} {reference.shape}")
    if len(reference.shape) != SPATIAL_DIMS:
        raise CaseError("unreadable_image", f"{roles[channel].name}: expected a 3-D volume, got {reference.shape}")
    seg = np.asarray(images[SEGMENTATION].dataobj)
    if not np.isfinite(seg).all():
        raise CaseError("invalid_mask", f"{roles[SEGMENTATION].name} holds NaN or infinite values")
    labels = set(np.unique(seg).astype(int).tolist())
    if not labels <= SEG_LABELS or not np.all(np.equal(np.mod(seg, 1), 0)):
        raise CaseError("invalid_mask", f"segmentation labels {sorted(labels)[:6]} are not BraTS labels "
                        f"{sorted(SEG_LABELS)}")
    data = np.asarray(reference.get_fdata(dtype=np.float32))
    if np.isinf(data).any():
        raise CaseError("unreadable_image", f"{roles[channel].name} holds infinite values")
    data = np.nan_to_num(data, nan=0.0)  # NaN marks the background outside a skull-stripping mask
    return NiftiCase(case_id, data, (seg > 0).astype(np.uint8), np.asarray(reference.affine, dtype=float))
