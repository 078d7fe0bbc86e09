"""Patient-based image geometry shared by the DICOM writer, the DICOM reader and the NIfTI files.

DICOM (PS3.3 C.7.6.2, Image Plane Module) places voxel ``(column i, row j)`` of a slice at::

    P = ImagePositionPatient + i·Δc·X + j·Δr·Y

in the patient-based LPS frame, where ``X`` and ``Y`` are the row and column direction cosines of
ImageOrientationPatient (X first), ``Δr, Δc = PixelSpacing`` (row spacing first) and the slice normal
is ``N = X × Y``. NIfTI-1 (``sform``) uses RAS, so the affine is ``diag(-1, -1, 1, 1) · A_LPS``.
Volumes are indexed ``[i (column), j (row), k (slice)]`` everywhere in this package, as nibabel does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def slice_normal(image_orientation_patient: Sequence[float]) -> np.ndarray:
    """The unit slice normal ``N = X × Y`` of an ImageOrientationPatient (PS3.3 C.7.6.2.1.1)."""
    orientation = np.asarray(image_orientation_patient, dtype=float)
    if orientation.shape != (6,):
        raise ValueError(f"ImageOrientationPatient must have 6 values, got {orientation.tolist()}")
    normal = np.cross(orientation[:3], orientation[3:])
    length = np.linalg.norm(normal)
    if length < 1e-6:
        raise ValueError(f"ImageOrientationPatient rows are parallel: {orientation.tolist()}")
    return normal / length


def ras_affine(
    first_position: Sequence[float],
    image_orientation_patient: Sequence[float],
    pixel_spacing: Sequence[float],
    slice_step: Sequence[float],
) -> np.ndarray:
    """The NIfTI RAS affine of a volume indexed ``[column, row, slice]``.

    ``first_position`` is the ImagePositionPatient of the first slice (after sorting along the
    normal), ``pixel_spacing`` is DICOM PixelSpacing ``(Δr, Δc)`` and ``slice_step`` the LPS vector
    from one slice origin to the next.
    """
    orientation = np.asarray(image_orientation_patient, dtype=float)
    row_spacing, column_spacing = (float(v) for v in pixel_spacing)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = orientation[:3] * column_spacing
    affine_lps[:3, 1] = orientation[3:] * row_spacing
    affine_lps[:3, 2] = np.asarray(slice_step, dtype=float)
    affine_lps[:3, 3] = np.asarray(first_position, dtype=float)
    return LPS_TO_RAS @ affine_lps
