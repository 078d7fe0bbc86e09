"""Read CT series from a DICOM tree: scan, group, sort along the slice normal, rescale, check geometry.

* grouping by StudyInstanceUID / SeriesInstanceUID (PS3.3 C.7.2.1, C.7.3.1), headers read with
  ``stop_before_pixels``;
* slice order by ImagePositionPatient projected on the normal ``X × Y`` of ImageOrientationPatient
  (PS3.3 C.7.6.2.1.1) — never by InstanceNumber or file name;
* Hounsfield units by ``stored · RescaleSlope + RescaleIntercept`` (PS3.3 C.11.1.1.2);
* a NIfTI RAS affine from the same geometry (:mod:`meddiff.data.geometry`).

A series that cannot be trusted raises :class:`SeriesError` with a reason code a user can act on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from meddiff.data.geometry import ras_affine, slice_normal

#: relative tolerance on slice spacing and pixel spacing agreement
SPACING_RTOL = 0.01
ORIENTATION_ATOL = 1e-4


class SeriesError(Exception):
    """A series that is rejected: ``reason`` is the quarantine code, ``path`` the offending file."""

    def __init__(self, reason: str, message: str, path: Path | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.path = path


@dataclass(frozen=True)
class SliceHeader:
    """The header fields of one DICOM file that grouping and geometry need."""

    path: Path
    patient_id: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    modality: str
    instance_number: int | None
    image_position_patient: tuple[float, ...] | None
    image_orientation_patient: tuple[float, ...] | None
    pixel_spacing: tuple[float, ...] | None
    rows: int | None
    columns: int | None


@dataclass(frozen=True)
class FileProblem:
    """A file in the imaging tree that is not a usable DICOM instance."""

    path: Path
    reason: str
    message: str


@dataclass
class CTVolume:
    """An assembled series in HU, indexed ``[column, row, slice]``, with its RAS affine."""

    hu: np.ndarray
    affine: np.ndarray
    spacing_mm: tuple[float, float, float]
    headers: list[SliceHeader]


def _floats(value: object) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None


def read_header(path: Path) -> SliceHeader | FileProblem:
    """Read one file's header (PS3.10 file format required); a problem names the reason."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError as error:
        return FileProblem(path, "not_dicom", f"not a DICOM file (PS3.10 preamble/DICM missing): {error}")
    except Exception as error:  # pydicom raises many types on damaged files; keep the message
        return FileProblem(path, "unreadable_dicom", f"cannot parse DICOM header: {type(error).__name__}: {error}")
    missing = [kw for kw in ("SeriesInstanceUID", "StudyInstanceUID", "SOPInstanceUID") if kw not in ds]
    if missing:
        return FileProblem(path, "missing_field", f"DICOM header lacks {', '.join(missing)}")
    instance = ds.get("InstanceNumber")
    return SliceHeader(
        path=path,
        patient_id=str(ds.get("PatientID", "")),
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        modality=str(ds.get("Modality", "")),
        instance_number=int(instance) if instance not in (None, "") else None,
        image_position_patient=_floats(ds.get("ImagePositionPatient")),
        image_orientation_patient=_floats(ds.get("ImageOrientationPatient")),
        pixel_spacing=_floats(ds.get("PixelSpacing")),
        rows=int(ds.Rows) if "Rows" in ds else None,
        columns=int(ds.Columns) if "Columns" in ds else None,
    )


def read_headers(paths: Iterable[Path]) -> list[SliceHeader | FileProblem]:
    """:func:`read_header` over many files (a unit of work for a worker process)."""
    return [read_header(path) for path in paths]


def rescale_to_hu(dataset: pydicom.Dataset) -> np.ndarray:
    """Stored values -> Hounsfield units: ``pixel · RescaleSlope + RescaleIntercept`` (C.11.1.1.2)."""
    slope = float(dataset.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(dataset.get("RescaleIntercept", 0.0) or 0.0)
    return dataset.pixel_array.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def sort_by_position(headers: list[SliceHeader]) -> tuple[list[SliceHeader], np.ndarray]:
    """Slices ordered along the slice normal, with their positions on it (mm, ascending)."""
    normal = slice_normal(headers[0].image_orientation_patient)  # type: ignore[arg-type]
    positions = np.array([float(np.dot(h.image_position_patient, normal)) for h in headers])
    order = np.argsort(positions, kind="stable")
    return [headers[i] for i in order], positions[order]


def check_geometry(headers: list[SliceHeader]) -> tuple[list[SliceHeader], float]:
    """Validate a series' geometry; return the sorted slices and the slice spacing (mm).

    Rejects missing Image Plane attributes, mixed orientations, differing pixel spacing or matrix,
    duplicate SOP instances and non-uniform slice spacing (gaps, overlaps, missing slices).
    """
    sops = [h.sop_instance_uid for h in headers]
    if len(set(sops)) != len(sops):
        duplicate = next(s for s in sops if sops.count(s) > 1)
        raise SeriesError("duplicate_sop_instance", f"SOPInstanceUID {duplicate} occurs more than once")
    for header in headers:
        if None in (header.image_position_patient, header.image_orientation_patient, header.pixel_spacing,
                    header.rows, header.columns):
            raise SeriesError("missing_geometry", "Image Plane Module attributes missing "
                              "(ImagePositionPatient/ImageOrientationPatient/PixelSpacing/Rows/Columns)",
                              header.path)
    reference = np.asarray(headers[0].image_orientation_patient)
    for header in headers[1:]:
        if not np.allclose(header.image_orientation_patient, reference, atol=ORIENTATION_ATOL):
            raise SeriesError("mixed_orientation", f"ImageOrientationPatient {header.image_orientation_patient} "
                              f"differs from {tuple(reference)}", header.path)
        if not np.allclose(header.pixel_spacing, headers[0].pixel_spacing, rtol=SPACING_RTOL):
            raise SeriesError("inconsistent_spacing", f"PixelSpacing {header.pixel_spacing} differs from "
                              f"{headers[0].pixel_spacing}", header.path)
        if (header.rows, header.columns) != (headers[0].rows, headers[0].columns):
            raise SeriesError("inconsistent_matrix", f"matrix {header.rows}x{header.columns} differs from "
                              f"{headers[0].rows}x{headers[0].columns}", header.path)
    ordered, positions = sort_by_position(headers)
    if len(ordered) < 2:
        return ordered, 1.0
    steps = np.diff(positions)
    if np.any(steps <= 1e-3):
        raise SeriesError("inconsistent_spacing", "two slices share one position along the normal")
    spacing = float(np.median(steps))
    if not np.allclose(steps, spacing, rtol=SPACING_RTOL, atol=1e-3):
        gap = int(np.argmax(np.abs(steps - spacing)))
        raise SeriesError("inconsistent_spacing", f"slice spacing varies from {steps.min():.2f} to "
                          f"{steps.max():.2f} mm (missing slice after {ordered[gap].path.name}?)",
                          ordered[gap].path)
    return ordered, spacing


def load_series(headers: list[SliceHeader]) -> CTVolume:
    """Assemble a checked series into a HU volume with its RAS affine (PS3.3 C.7.6.2)."""
    ordered, spacing = check_geometry(headers)
    frames = []
    for header in ordered:
        try:
            dataset = pydicom.dcmread(header.path)
        except Exception as error:
            raise SeriesError("unreadable_dicom", f"{header.path.name}: {type(error).__name__}: {error}",
                              header.path) from None
        if "PixelData" not in dataset:
            raise SeriesError("missing_pixel_data", f"{header.path.name} has no PixelData (7FE0,0010)", header.path)
        try:
            frame = rescale_to_hu(dataset)
        except ValueError as error:
            reason = "truncated_dicom" if "less than expected" in str(error) else "unreadable_pixel_data"
            raise SeriesError(reason, f"{header.path.name}: {error}", header.path) from None
        frames.append(frame.T)  # (rows, columns) -> [column, row]
    hu = np.stack(frames, axis=-1)
    first = ordered[0]
    normal = slice_normal(first.image_orientation_patient)  # type: ignore[arg-type]
    if len(ordered) > 1:  # the mean step between slice origins (also right for a tilted gantry)
        step = (np.asarray(ordered[-1].image_position_patient) - np.asarray(first.image_position_patient)) / (
            len(ordered) - 1
        )
    else:
        step = normal * spacing
    affine = ras_affine(first.image_position_patient, first.image_orientation_patient,  # type: ignore[arg-type]
                        first.pixel_spacing, step)  # type: ignore[arg-type]
    row_spacing, column_spacing = first.pixel_spacing  # type: ignore[misc]
    return CTVolume(hu=hu, affine=affine, spacing_mm=(column_spacing, row_spacing, spacing), headers=ordered)
