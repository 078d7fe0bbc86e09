"""NIfTI imaging in the BraTS layout: ``imaging/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz``.

The BraTS challenge (Menze et al., IEEE TMI 2015; Baid et al., arXiv:2107.02314) ships co-registered
MR channels and a tumour segmentation per case (labels 1 necrotic core, 2 oedema, 4 enhancing; 3 in
BraTS 2023). ``ingest`` takes one channel (``ingest.brats_channel``) as the patient's image, the
segmentation (any label > 0) as the lesion mask, and the case name as the patient id. All five files
must be present with one shape and one affine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

CHANNELS: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
SEGMENTATION = "seg"
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
    stem = path.name.removesuffix(".gz").removesuffix(".nii")
    prefix = f"{case_id}_"
    return stem[len(prefix):] if stem.startswith(prefix) else None


def load_brats_case(case_id: str, files: list[Path], channel: str) -> NiftiCase:
    """Check and read one case; raise :class:`CaseError` with a reason code."""
    roles: dict[str, Path] = {}
    for path in files:
        role = _role(case_id, path)
        if role not in (*CHANNELS, SEGMENTATION):
            raise CaseError("unexpected_file", f"{path.name}: expected {case_id}_<t1|t1ce|t2|flair|seg>.nii.gz")
        roles[role] = path
    missing = [r for r in (*CHANNELS, SEGMENTATION) if r not in roles]
    if missing:
        raise CaseError("incomplete_case", f"case {case_id} lacks {', '.join(missing)}")
    images = {}
    for role, path in roles.items():
        try:
            images[role] = nib.load(path)
            images[role].get_fdata(dtype=np.float32) if role in (channel, SEGMENTATION) else None
        except Exception as error:
            raise CaseError("unreadable_image", f"{path.name}: {type(error).__name__}: {error}") from None
    reference = images[channel]
    for role, image in images.items():
        if image.shape != reference.shape or not np.allclose(image.affine, reference.affine, atol=1e-3):
            raise CaseError("geometry_mismatch", f"{roles[role].name}: shape {image.shape} / affine differ from "
                            f"{roles[channel].name} {reference.shape}")
    if len(reference.shape) != 3:
        raise CaseError("unreadable_image", f"{roles[channel].name}: expected a 3-D volume, got {reference.shape}")
    seg = np.asarray(images[SEGMENTATION].dataobj)
    labels = set(np.unique(seg).astype(int).tolist())
    if not labels <= SEG_LABELS or not np.all(np.equal(np.mod(seg, 1), 0)):
        raise CaseError("invalid_mask", f"segmentation labels {sorted(labels)[:6]} are not BraTS labels "
                        f"{sorted(SEG_LABELS)}")
    data = np.asarray(reference.get_fdata(dtype=np.float32))
    if not np.isfinite(data).all():
        raise CaseError("unreadable_image", f"{roles[channel].name} holds NaN or infinite values")
    return NiftiCase(case_id, data, (seg > 0).astype(np.uint8), np.asarray(reference.affine, dtype=float))
