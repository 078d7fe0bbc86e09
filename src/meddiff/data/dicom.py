"""Read CT series from a DICOM tree: scan, group, sort along the slice normal, rescale, check geometry.

* grouping by StudyInstanceUID / SeriesInstanceUID (PS3.3 C.7.2.1, C.7.3.1), headers read with
  ``stop_before_pixels``;
* slice order by ImagePositionPatient projected on the normal ``X × Y`` of ImageOrientationPatient
  (PS3.3 C.7.6.2.1.1) — never by InstanceNumber or file name;
* Hounsfield units by ``stored · RescaleSlope + RescaleIntercept`` (PS3.3 C.11.1.1.2);
* a NIfTI RAS affine from the same geometry (:mod:`meddiff.data.geometry`);
* multi-frame files: Enhanced CT/MR (PS3.3 C.7.6.16, per-frame and shared functional groups: Plane
  Position, Plane Orientation, Pixel Measures, Pixel Value Transformation) and legacy multi-frame with
  GridFrameOffsetVector (C.8.8.3.2) become one :class:`SliceHeader` per frame, so grouping and geometry
  checks treat frames like slices;
* compressed transfer syntaxes are decoded by pydicom's pixel data handlers: RLE Lossless (built in or
  pylibjpeg-rle), JPEG baseline/extended/lossless (pylibjpeg-libjpeg), JPEG-LS (pyjpegls), JPEG 2000
  (pylibjpeg-openjpeg);
* localizers (ImageType value LOCALIZER, C.8.2.1.1.1) are rejected.

A series that cannot be trusted raises :class:`SeriesError` with a reason code a user can act on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    image_type: tuple[str, ...] = ()
    #: frame index in a multi-frame file (None: a single-frame instance)
    frame: int | None = None
    #: (RescaleSlope, RescaleIntercept) of this frame when a functional group gives it
    rescale: tuple[float, float] | None = None


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
    #: the header of the lowest slice, pixel data removed (for the de-identified header copy)
    reference: Any = field(default=None, repr=False)


def _floats(value: object) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None


def _first_item(dataset: Any, keyword: str) -> Any:
    sequence = dataset.get(keyword) if dataset is not None else None
    return sequence[0] if sequence else None


def _frame_attribute(groups: list[Any], sequence: str, keyword: str) -> Any:
    """``keyword`` from the first functional group (per-frame before shared) that has it."""
    for group in groups:
        item = _first_item(group, sequence)
        if item is not None and keyword in item:
            return item.get(keyword)
    return None


def _frame_headers(ds: Any, path: Path, base: dict[str, Any], n_frames: int) -> list[SliceHeader]:
    """One header per frame of a multi-frame instance (Enhanced IODs or GridFrameOffsetVector)."""
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    headers = []
    if per_frame or shared is not None:
        for k in range(n_frames):
            groups = [g for g in ((per_frame[k] if k < len(per_frame) else None), shared) if g is not None]
            slope = _frame_attribute(groups, "PixelValueTransformationSequence", "RescaleSlope")
            intercept = _frame_attribute(groups, "PixelValueTransformationSequence", "RescaleIntercept")
            frame_type = _frame_attribute(groups, "CTImageFrameTypeSequence", "FrameType") or _frame_attribute(
                groups, "MRImageFrameTypeSequence", "FrameType")
            headers.append(SliceHeader(
                **{**base, "image_type": tuple(str(v) for v in (frame_type or base["image_type"]))},
                image_position_patient=_floats(_frame_attribute(groups, "PlanePositionSequence",
                                                                "ImagePositionPatient")),
                image_orientation_patient=_floats(_frame_attribute(groups, "PlaneOrientationSequence",
                                                                   "ImageOrientationPatient")),
                pixel_spacing=_floats(_frame_attribute(groups, "PixelMeasuresSequence", "PixelSpacing")),
                frame=k,
                rescale=(float(slope), float(intercept)) if slope is not None and intercept is not None else None,
            ))
        return headers
    position = _floats(ds.get("ImagePositionPatient"))
    orientation = _floats(ds.get("ImageOrientationPatient"))
    offsets = _floats(ds.get("GridFrameOffsetVector"))
    for k in range(n_frames):
        frame_position = None
        if position is not None and orientation is not None and offsets is not None and len(offsets) == n_frames:
            frame_position = tuple(float(v) for v in np.asarray(position) + offsets[k] * slice_normal(orientation))
        headers.append(SliceHeader(**base, image_position_patient=frame_position,
                                   image_orientation_patient=orientation,
                                   pixel_spacing=_floats(ds.get("PixelSpacing")), frame=k))
    return headers


def read_file_headers(path: Path) -> list[SliceHeader] | FileProblem:
    """Header(s) of one file (PS3.10 file format required): one per frame; a problem names the reason."""
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
    try:
        n_frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        n_frames = 1
    base: dict[str, Any] = {
        "path": path,
        "patient_id": str(ds.get("PatientID", "")),
        "study_instance_uid": str(ds.StudyInstanceUID),
        "series_instance_uid": str(ds.SeriesInstanceUID),
        "sop_instance_uid": str(ds.SOPInstanceUID),
        "modality": str(ds.get("Modality", "")),
        "instance_number": int(instance) if instance not in (None, "") else None,
        "rows": int(ds.Rows) if "Rows" in ds else None,
        "columns": int(ds.Columns) if "Columns" in ds else None,
        "image_type": tuple(str(v).strip() for v in (ds.get("ImageType") or ())),
    }
    if n_frames > 1 or "PerFrameFunctionalGroupsSequence" in ds:
        return _frame_headers(ds, path, base, n_frames)
    return [SliceHeader(
        **base,
        image_position_patient=_floats(ds.get("ImagePositionPatient")),
        image_orientation_patient=_floats(ds.get("ImageOrientationPatient")),
        pixel_spacing=_floats(ds.get("PixelSpacing")),
    )]


def read_header(path: Path) -> SliceHeader | FileProblem:
    """The header of a single-frame file (the first frame's of a multi-frame one)."""
    headers = read_file_headers(path)
    return headers if isinstance(headers, FileProblem) else headers[0]


def read_headers(paths: Iterable[Path]) -> list[SliceHeader | FileProblem]:
    """:func:`read_file_headers` over many files, flattened (a unit of work for a worker process)."""
    out: list[SliceHeader | FileProblem] = []
    for path in paths:
        headers = read_file_headers(path)
        if isinstance(headers, FileProblem):
            out.append(headers)
        else:
            out.extend(headers)
    return out


def read_pixels(dataset: pydicom.Dataset) -> np.ndarray:
    """Rescaled pixel values of every frame, ``(frames, rows, columns)`` float32.

    Decoding goes through ``Dataset.pixel_array`` (pydicom's handlers for native and compressed
    transfer syntaxes); the Modality LUT is linear: ``stored · slope + intercept`` (C.11.1.1.2) with the
    per-frame Pixel Value Transformation of Enhanced IODs where present, else the dataset's own.
    """
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2"))
    if not photometric.startswith("MONOCHROME"):
        raise ValueError(f"PhotometricInterpretation {photometric}: only greyscale images are supported")
    pixels = dataset.pixel_array
    n_frames = int(dataset.get("NumberOfFrames") or 1)
    frames = pixels.reshape(n_frames, *pixels.shape[-2:]).astype(np.float32)
    if "PerFrameFunctionalGroupsSequence" in dataset or "SharedFunctionalGroupsSequence" in dataset:
        shared = _first_item(dataset, "SharedFunctionalGroupsSequence")
        per_frame = dataset.get("PerFrameFunctionalGroupsSequence") or []
        for k in range(n_frames):
            groups = [g for g in ((per_frame[k] if k < len(per_frame) else None), shared) if g is not None]
            slope = _frame_attribute(groups, "PixelValueTransformationSequence", "RescaleSlope")
            intercept = _frame_attribute(groups, "PixelValueTransformationSequence", "RescaleIntercept")
            frames[k] = frames[k] * np.float32(float(slope if slope is not None else 1.0)) + np.float32(
                float(intercept if intercept is not None else 0.0))
        return frames
    slope = float(dataset.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(dataset.get("RescaleIntercept", 0.0) or 0.0)
    return frames * np.float32(slope) + np.float32(intercept)


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
    if any("LOCALIZER" in h.image_type for h in headers):
        header = next(h for h in headers if "LOCALIZER" in h.image_type)
        image_type = "\\".join(header.image_type)
        raise SeriesError("localizer", f"ImageType {image_type}: a localizer (scout) image, not a "
                          "cross-sectional series", header.path)
    seen: dict[tuple[str, int | None], Path] = {}
    for header in headers:
        key = (header.sop_instance_uid, header.frame)
        if key in seen:
            raise SeriesError("duplicate_sop_instance", f"SOPInstanceUID {header.sop_instance_uid} occurs more "
                              f"than once ({seen[key].name} and {header.path.name})", header.path)
        seen[key] = header.path
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
    decoded: dict[Path, np.ndarray] = {}
    reference = None
    for header in ordered:
        if header.path not in decoded:
            decoded.clear()  # frames of one file are adjacent after sorting, or the file is read again
            try:
                dataset = pydicom.dcmread(header.path)
            except Exception as error:
                raise SeriesError("unreadable_dicom", f"{header.path.name}: {type(error).__name__}: {error}",
                                  header.path) from None
            if "PixelData" not in dataset and "FloatPixelData" not in dataset:
                raise SeriesError("missing_pixel_data", f"{header.path.name} has no PixelData (7FE0,0010)",
                                  header.path)
            try:
                decoded[header.path] = read_pixels(dataset)
            except Exception as error:  # decoder plug-ins raise their own types
                reason = "truncated_dicom" if "less than expected" in str(error) else "unreadable_pixel_data"
                raise SeriesError(reason, f"{header.path.name}: {type(error).__name__}: {error}",
                                  header.path) from None
            if reference is None:
                del dataset.PixelData
                reference = dataset
        frame = decoded[header.path][header.frame or 0]
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
    return CTVolume(hu=hu, affine=affine, spacing_mm=(column_spacing, row_spacing, spacing), headers=ordered,
                    reference=reference)
