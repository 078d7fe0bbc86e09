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
* localizers (ImageType value LOCALIZER, C.8.2.1.1.1) inside a series are dropped and the volume kept;
  a series of localizers only is rejected;
* what real exports write is read leniently where the standard's intent is clear: decimal strings with a
  decimal comma (``6,000000``, PS3.5 6.2 DS allows only ``.``) are read with a point; a data set without the
  PS3.10 preamble, ``DICM`` and file meta group is read in the transfer syntax pydicom detects (DICOM's
  default, Implicit VR Little Endian, for pre-PS3.10 archives) when it parses as a complete data set
  (study, series and SOP instance UIDs present); a DICOMDIR (Media Storage Directory, PS3.10 8.6) is
  reported as a media directory, not as an image;
* a gantry-tilted (sheared) stack, whose slice origins do not step along the slice normal, is resampled
  per slice onto the orthogonal grid of the slice plane (linear interpolation, as dcm2niix does), so the
  NIfTI affine has no shear and qform and sform agree;
* a file that ends before its last element does (an interrupted transfer) is ``truncated_dicom``, and
  that reason wins over any other of its series.

A series that cannot be trusted raises :class:`SeriesError` with a reason code a user can act on; one bad
header value quarantines its file or series (``invalid_header_value``, the value quoted), never more.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from meddiff.data.deid import elements_with_vr, person_names
from meddiff.data.geometry import ras_affine, slice_normal

#: relative tolerance on slice spacing and pixel spacing agreement
SPACING_RTOL = 0.01
ORIENTATION_ATOL = 1e-4
#: in-plane drift of slice origins (voxels) below which a stack is not sheared (no resampling)
SHEAR_TOLERANCE_VOXELS = 0.01
#: SOP Class UID of a DICOMDIR: Media Storage Directory Storage (PS3.4 Annex I)
MEDIA_STORAGE_DIRECTORY_STORAGE = "1.2.840.10008.1.3.10"
#: the file ID of a DICOMDIR on a PS3.12 medium (PS3.10 8.6)
DICOMDIR_FILE_NAME = "DICOMDIR"
MEDIA_DIRECTORY_MESSAGE = ("a DICOMDIR (Media Storage Directory, PS3.10 8.6): the index of a medium, not an "
                           "image; the images it lists are read from the tree")
#: header values the geometry or the Modality LUT depend on: a bad one rejects the file or series
ESSENTIAL_NUMERIC_KEYWORDS: frozenset[str] = frozenset({
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "RescaleSlope", "RescaleIntercept",
    "NumberOfFrames", "GridFrameOffsetVector",
})
#: undefined length (PS3.5 7.1.1): a sequence or encapsulated pixel data, delimited by items
UNDEFINED_LENGTH = 0xFFFFFFFF
#: bytes of the PixelData element header: tag, VR, 2 reserved, 4-byte length (explicit VR OB/OW)
_EXPLICIT_LONG_HEADER = 12
_IMPLICIT_HEADER = 8
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian
#: transfer syntaxes whose pixel data are the stored values as written (PS3.5 A.1, A.2), little endian
_NATIVE_LITTLE_ENDIAN = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian})
#: the one sample size read without pydicom: 16 bits allocated (any 1–16 of them stored)
_NATIVE_BITS = 16
_NATIVE_BYTES = _NATIVE_BITS // 8
#: elements that make the pixel data something else than one plain greyscale frame
_NOT_PLAIN_PIXELS = ("FloatPixelData", "DoubleFloatPixelData", "PerFrameFunctionalGroupsSequence",
                     "SharedFunctionalGroupsSequence")
_DECIMAL_COMMA = re.compile(r"[+-]?\d*,\d+(?:[eE][+-]?\d+)?|[+-]?\d+,")


class SeriesError(Exception):
    """A series that is rejected: ``reason`` is the quarantine code, ``path`` the offending file."""

    def __init__(self, reason: str, message: str, path: Path | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.path = path


@dataclass(frozen=True)
class NativePixels:
    """Where the native 16-bit pixel values of a single-frame file lie, with its Modality LUT
    (``value · slope + intercept``, C.11.1.1.2): what :func:`load_series` needs to read the frame without
    parsing the file a second time (issue 14: the second parse was a third of ingest's imaging time)."""

    offset: int  # of the first pixel byte in the file
    dtype: str  # "<i2" (PixelRepresentation 1) or "<u2"
    bits_stored: int  # the bits above them are ignored (masked, or sign-extended), as pydicom does
    slope: float
    intercept: float


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
    #: a problem of this file that condemns its series whatever else holds: (reason, message)
    problem: tuple[str, str] | None = None
    #: every person name in the header, in every plausible character set (for the note scrubber)
    names: tuple[str, ...] = ()
    #: set when the frame can be read straight from the file (:func:`native_pixels`), else ``None``
    pixels: NativePixels | None = None


@dataclass(frozen=True)
class FileProblem:
    """A file in the imaging tree that is not a usable DICOM instance (with whose it is, when readable:
    a rejected file's names must still be scrubbed from that patient's notes)."""

    path: Path
    reason: str
    message: str
    patient_id: str | None = None
    names: tuple[str, ...] = ()


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


def _element_text(element: Any) -> str:
    """The value of a DS/IS element as the text written in the file (``\\`` between values)."""
    value = element.value
    if isinstance(value, bytes):
        return value.decode("ascii", errors="replace")
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(getattr(v, "original_string", v)) for v in value)
    return str(getattr(value, "original_string", value))


def _lenient_number(part: str, vr: str) -> str | None:
    """One DS/IS value as valid text (a decimal comma read as a point), or ``None`` if it is no number."""
    text = part.strip()
    if not text:
        return text
    if _DECIMAL_COMMA.fullmatch(text):
        text = text.replace(",", ".")
    try:
        number = float(text)
    except ValueError:
        return None
    if not np.isfinite(number):
        return None
    if vr == "IS":
        return str(int(number)) if number == int(number) else None
    return text


def repair_numeric_strings(dataset: Any) -> list[tuple[str, str]]:
    """Make every DS and IS value of ``dataset`` (nested sequences included) readable, in place.

    A decimal comma is read as a decimal point and an integral IS written as ``3.0`` as ``3`` (the
    writer's intent is clear); any other value that is not a number is emptied (PS3.5 6.2: an empty value
    means unknown). Returns ``(keyword, text)`` of the emptied values of :data:`ESSENTIAL_NUMERIC_KEYWORDS`:
    those make the file unusable.
    """
    lost: list[tuple[str, str]] = []
    for tag, element, vr in elements_with_vr(dataset):
        if vr == "SQ":
            for item in dataset[tag].value or []:
                lost.extend(repair_numeric_strings(item))
            continue
        if vr not in ("DS", "IS"):
            continue
        text = _element_text(element)
        parts = [_lenient_number(part, vr) for part in text.split("\\")]
        if None in parts:
            keyword = pydicom.datadict.keyword_for_tag(tag) or str(tag)
            if keyword in ESSENTIAL_NUMERIC_KEYWORDS:
                lost.append((keyword, text))
            dataset[tag] = DataElement(tag, vr, None)
            continue
        repaired = "\\".join(p for p in parts if p is not None)
        # padding alone (PS3.5 6.2: leading/trailing spaces of DS/IS are insignificant) reads the same as is;
        # rewriting every padded value cost ~10 new elements per file (issue 14 profile)
        if repaired != text and repaired != "\\".join(part.strip() for part in text.split("\\")):
            dataset[tag] = DataElement(tag, vr, repaired.split("\\") if len(parts) > 1 else repaired)
    return lost


def _bad_values_message(lost: list[tuple[str, str]]) -> str:
    return "; ".join(f"{keyword} {text!r} is not a number (PS3.5 6.2 DS/IS)" for keyword, text in lost)


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


def _transfer_syntax_of_bare(dataset: Any) -> str:
    """The transfer syntax pydicom detected for a data set without file meta (implicit VR LE by default)."""
    implicit, little = getattr(dataset, "original_encoding", (True, True))
    if implicit in (None, True):
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little in (None, True) else ExplicitVRBigEndian


def read_dataset(path: Path, *, stop_before_pixels: bool) -> tuple[Any, int]:
    """A PS3.10 file, or a bare data set without preamble/meta when it is a complete one.

    Returns ``(dataset, offset)``: ``offset`` is where reading stopped (the PixelData tag with
    ``stop_before_pixels``). Raises ``InvalidDicomError`` for anything else. A bare data set gets a file
    meta group with the transfer syntax it was read in, so its pixel data decode.
    """
    with open(path, "rb") as handle:
        try:
            dataset = pydicom.dcmread(handle, stop_before_pixels=stop_before_pixels)
            return dataset, handle.tell()
        except InvalidDicomError as error:
            original = error
        handle.seek(0)
        try:
            dataset = pydicom.dcmread(handle, stop_before_pixels=stop_before_pixels, force=True)
        except Exception:  # what force=True makes of a non-DICOM file is not a data set: keep the first error
            raise original from None
        offset = handle.tell()
    uids = [dataset.get(k) for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")]
    if not all(isinstance(v, str) and pydicom.uid.UID(v).is_valid for v in uids):
        raise original
    dataset.file_meta = pydicom.dataset.FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = _transfer_syntax_of_bare(dataset)
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    return dataset, offset


def _truncation(path: Path, dataset: Any, offset: int) -> str | None:
    """Why ``path`` looks cut short (its last element or its pixel data ends past the end of the file)."""
    size = os.path.getsize(path)
    if offset < size:  # stopped at the PixelData tag: does the file hold the length it declares?
        with open(path, "rb") as handle:
            handle.seek(offset)
            head = handle.read(_EXPLICIT_LONG_HEADER)
        if not head.startswith(_PIXEL_DATA_TAG):
            return None
        explicit = head[4:6] in (b"OB", b"OW")
        header = _EXPLICIT_LONG_HEADER if explicit else _IMPLICIT_HEADER
        length = int.from_bytes(head[header - 4 : header], "little")
        if length != UNDEFINED_LENGTH and offset + header + length > size:
            return f"{path.name}: the file ends after {size - offset - header} of the {length} bytes of its pixel data"
        return None
    tags = list(dataset.keys())
    if not tags:
        return None
    last = dataset.get_item(tags[-1])
    if isinstance(last, RawDataElement) and last.length != UNDEFINED_LENGTH and last.value is not None:
        if len(last.value) < last.length:
            return (f"{path.name}: the file ends inside element {last.tag} ({len(last.value)} of its "
                    f"{last.length} bytes)")
        if last.value_tell + last.length < size:
            return f"{path.name}: the file ends inside the header of the element after {last.tag}"
    return None


def _int_or_none(value: object) -> int | None:
    try:
        return int(value) if value not in (None, "") else None  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def read_file_headers(path: Path) -> list[SliceHeader] | FileProblem:
    """Header(s) of one file: one per frame; a problem names the reason (one bad value never raises).

    A file that ends early is ``truncated_dicom``: as a problem of its series when its SeriesInstanceUID
    was read (the most specific reason of that series), else as a file problem.
    """
    if path.name.upper() == DICOMDIR_FILE_NAME:
        return FileProblem(path, "media_directory", MEDIA_DIRECTORY_MESSAGE)
    try:
        ds, offset = read_dataset(path, stop_before_pixels=True)
    except InvalidDicomError as error:
        return FileProblem(path, "not_dicom", f"not a DICOM file (PS3.10 preamble/DICM missing): {error}")
    except Exception as error:  # pydicom raises many types on damaged files; keep the message
        return FileProblem(path, "unreadable_dicom", f"cannot parse DICOM header: {type(error).__name__}: {error}")
    try:
        return _headers_of(path, ds, offset)
    except Exception as error:  # values are converted lazily: a bad one is this file's problem, not the stage's
        return FileProblem(path, "invalid_header_value", f"cannot read a header value: {type(error).__name__}: "
                           f"{error}")


def _headers_of(path: Path, ds: Any, offset: int) -> list[SliceHeader] | FileProblem:
    media_class = str(getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", "") or "")
    if MEDIA_STORAGE_DIRECTORY_STORAGE in (media_class, str(ds.get("SOPClassUID", ""))):
        return FileProblem(path, "media_directory", MEDIA_DIRECTORY_MESSAGE)
    truncated = _truncation(path, ds, offset)
    names = person_names(ds)
    patient_id = str(ds.get("PatientID", "") or "") or None
    missing = [kw for kw in ("SeriesInstanceUID", "StudyInstanceUID", "SOPInstanceUID") if kw not in ds]
    if missing:
        image_class = "Image Storage" in pydicom.uid.UID(media_class).name
        if truncated is None and image_class and offset >= os.path.getsize(path) and "PixelData" not in ds:
            truncated = (f"{path.name}: an image file that ends after {offset} bytes, before its "
                         f"{', '.join(missing)} and pixel data (an interrupted transfer)")
        if truncated is not None:
            return FileProblem(path, "truncated_dicom", truncated, patient_id, names)
        return FileProblem(path, "missing_field", f"DICOM header lacks {', '.join(missing)}", patient_id, names)
    lost = repair_numeric_strings(ds)
    problem = ("truncated_dicom", truncated) if truncated is not None else None
    if lost and problem is None:
        return FileProblem(path, "invalid_header_value", f"{path.name}: {_bad_values_message(lost)}", patient_id,
                           names)
    n_frames = _int_or_none(ds.get("NumberOfFrames")) or 1
    base: dict[str, Any] = {
        "path": path,
        "patient_id": patient_id or "",
        "study_instance_uid": str(ds.StudyInstanceUID),
        "series_instance_uid": str(ds.SeriesInstanceUID),
        "sop_instance_uid": str(ds.SOPInstanceUID),
        "modality": str(ds.get("Modality", "") or ""),
        "instance_number": _int_or_none(ds.get("InstanceNumber")),
        "rows": _int_or_none(ds.get("Rows")),
        "columns": _int_or_none(ds.get("Columns")),
        "image_type": tuple(str(v).strip() for v in (ds.get("ImageType") or ())),
        "problem": problem,
        "names": names,
    }
    if n_frames > 1 or "PerFrameFunctionalGroupsSequence" in ds:
        return _frame_headers(ds, path, base, n_frames)
    return [SliceHeader(
        **base,
        image_position_patient=_floats(ds.get("ImagePositionPatient")),
        image_orientation_patient=_floats(ds.get("ImageOrientationPatient")),
        pixel_spacing=_floats(ds.get("PixelSpacing")),
        pixels=native_pixels(path, ds, offset) if problem is None else None,
    )]


def native_pixels(path: Path, ds: Any, offset: int) -> NativePixels | None:
    """How to read the one frame of ``path`` without pydicom, or ``None`` unless it is the plain case:
    native little-endian transfer syntax, one greyscale sample of 16 bits allocated (1–16 stored), a defined
    length of exactly ``Rows · Columns · 2`` bytes and nothing after the pixel data (``ds`` was read up to
    ``offset``, the PixelData tag, and its DS/IS values repaired). ``pixel_array`` gives the same values
    for that case; every other file is decoded by pydicom as before."""
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if syntax not in _NATIVE_LITTLE_ENDIAN or any(keyword in ds for keyword in _NOT_PLAIN_PIXELS):
        return None
    rows, columns = _int_or_none(ds.get("Rows")), _int_or_none(ds.get("Columns"))
    representation = _int_or_none(ds.get("PixelRepresentation"))
    bits_stored = _int_or_none(ds.get("BitsStored"))
    layout = (_int_or_none(ds.get("SamplesPerPixel")), _int_or_none(ds.get("BitsAllocated")),
              _int_or_none(ds.get("NumberOfFrames")) or 1)
    if (not rows or not columns or representation not in (0, 1) or layout != (1, _NATIVE_BITS, 1)
            or bits_stored is None or not 1 <= bits_stored <= _NATIVE_BITS
            or not str(ds.get("PhotometricInterpretation", "")).startswith("MONOCHROME")):
        return None
    with open(path, "rb") as handle:
        handle.seek(offset)
        head = handle.read(_EXPLICIT_LONG_HEADER)
    explicit = syntax == ExplicitVRLittleEndian
    if not head.startswith(_PIXEL_DATA_TAG) or (explicit and head[4:6] not in (b"OB", b"OW")):
        return None
    header = _EXPLICIT_LONG_HEADER if explicit else _IMPLICIT_HEADER
    length = int.from_bytes(head[header - 4 : header], "little")
    if length != rows * columns * _NATIVE_BYTES or offset + header + length != os.path.getsize(path):
        return None
    try:  # as read_pixels reads them; a value it cannot read stays pydicom's (and that series') problem
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    except (TypeError, ValueError):
        return None
    return NativePixels(offset + header, "<i2" if representation == 1 else "<u2", bits_stored, slope, intercept)


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

    Drops localizer (scout) images exported inside the series; rejects a series of localizers only,
    missing Image Plane attributes, mixed orientations, differing pixel spacing or matrix, duplicate SOP
    instances and non-uniform slice spacing along the normal (gaps, overlaps, missing slices).
    """
    localizers = [h for h in headers if "LOCALIZER" in h.image_type]
    if len(localizers) == len(headers):
        image_type = "\\".join(localizers[0].image_type)
        raise SeriesError("localizer", f"ImageType {image_type}: a localizer (scout) image, not a "
                          "cross-sectional series", localizers[0].path)
    headers = [h for h in headers if "LOCALIZER" not in h.image_type]  # a scout exported inside the series
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


def series_file_problem(headers: list[SliceHeader]) -> tuple[str, str] | None:
    """The problem of one of the series' files that wins over every other reason (truncation), or ``None``."""
    return next((h.problem for h in headers if h.problem is not None), None)


def _read_pixel_file(path: Path) -> tuple[np.ndarray, Any]:
    """Rescaled frames of one file and its dataset without pixel data; :class:`SeriesError` on failure."""
    try:
        dataset, _ = read_dataset(path, stop_before_pixels=False)
    except Exception as error:
        raise SeriesError("unreadable_dicom", f"{path.name}: {type(error).__name__}: {error}", path) from None
    lost = repair_numeric_strings(dataset)
    if lost:
        raise SeriesError("invalid_header_value", f"{path.name}: {_bad_values_message(lost)}", path)
    if "PixelData" not in dataset and "FloatPixelData" not in dataset:
        raise SeriesError("missing_pixel_data", f"{path.name} has no PixelData (7FE0,0010)", path)
    try:
        frames = read_pixels(dataset)
    except Exception as error:  # decoder plug-ins raise their own types
        reason = "truncated_dicom" if "less than expected" in str(error) else "unreadable_pixel_data"
        raise SeriesError(reason, f"{path.name}: {type(error).__name__}: {error}", path) from None
    if "PixelData" in dataset:
        del dataset.PixelData
    return frames, dataset


def _read_native_frame(header: SliceHeader) -> np.ndarray | None:
    """``(1, rows, columns)`` rescaled values of a file with :class:`NativePixels`, as :func:`read_pixels`
    computes them; ``None`` when it has none or the file no longer holds them (then pydicom reads it)."""
    pixels = header.pixels
    if pixels is None or not header.rows or not header.columns:
        return None
    count = header.rows * header.columns
    try:
        values = np.fromfile(header.path, dtype=pixels.dtype, count=count, offset=pixels.offset)
    except OSError:  # gone since the header scan: pydicom's read names the problem
        return None
    if values.size != count:
        return None
    unused = _NATIVE_BITS - pixels.bits_stored
    if unused:  # pydicom's correction of unused bits (PS3.5 8.1.1): shift them out, in the sample's own type
        np.left_shift(values, unused, out=values)
        np.right_shift(values, unused, out=values)
    frames = values.reshape(1, header.rows, header.columns).astype(np.float32)
    return frames * np.float32(pixels.slope) + np.float32(pixels.intercept)


def in_plane_offsets(headers: list[SliceHeader]) -> np.ndarray:
    """``(slices, 2)``: how far each slice origin lies off the slice normal through the first one, in
    (column, row) voxels. Zero for an orthogonal stack; ``k · tan(tilt) · step / Δ`` for a tilted gantry."""
    first = headers[0]
    orientation = np.asarray(first.image_orientation_patient, dtype=float)
    normal = slice_normal(orientation)
    row_spacing, column_spacing = (float(v) for v in first.pixel_spacing)  # type: ignore[union-attr]
    origin = np.asarray(first.image_position_patient, dtype=float)
    offsets = []
    for header in headers:
        drift = np.asarray(header.image_position_patient, dtype=float) - origin
        drift -= float(np.dot(drift, normal)) * normal
        offsets.append((float(np.dot(drift, orientation[:3])) / column_spacing,
                        float(np.dot(drift, orientation[3:])) / row_spacing))
    return np.asarray(offsets)


def deshear(volume: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Resample each slice ``[column, row]`` of a sheared stack by its in-plane offset (linear), so that
    voxel ``(i, j, k)`` lies at ``first origin + i·Δc·X + j·Δr·Y + k·spacing·N``; voxels that had no
    data take the volume's minimum (air in CT, background in MR)."""
    from scipy.ndimage import shift

    fill = float(volume.min())
    out = np.empty_like(volume)
    for k in range(volume.shape[2]):
        out[:, :, k] = shift(volume[:, :, k], offsets[k], order=1, mode="constant", cval=fill)
    return out


def load_series(headers: list[SliceHeader]) -> CTVolume:
    """Assemble a checked series into a rescaled volume with its RAS affine (PS3.3 C.7.6.2).

    A sheared stack (gantry tilt) is resampled onto the orthogonal grid of its slice plane
    (:func:`deshear`); every other volume keeps its stored samples exactly.
    """
    problem = series_file_problem(headers)
    if problem is not None:
        raise SeriesError(*problem)
    ordered, spacing = check_geometry(headers)
    frames = []
    decoded: dict[Path, np.ndarray] = {}
    reference = None
    for header in ordered:
        if header.path not in decoded:
            decoded.clear()  # frames of one file are adjacent after sorting, or the file is read again
            native = _read_native_frame(header) if reference is not None else None
            if native is not None:
                decoded[header.path] = native
            else:
                decoded[header.path], dataset = _read_pixel_file(header.path)
                if reference is None:
                    reference = dataset
        frame = decoded[header.path][header.frame or 0]
        frames.append(frame.T)  # (rows, columns) -> [column, row]
    hu = np.stack(frames, axis=-1)
    first = ordered[0]
    normal = slice_normal(first.image_orientation_patient)  # type: ignore[arg-type]
    step = normal * spacing
    if len(ordered) > 1:
        offsets = in_plane_offsets(ordered)
        if np.abs(offsets).max() > SHEAR_TOLERANCE_VOXELS:
            hu = deshear(hu, offsets)
        else:  # the mean step between slice origins (keeps the written positions exactly)
            step = (np.asarray(ordered[-1].image_position_patient) - np.asarray(first.image_position_patient)) / (
                len(ordered) - 1)
    affine = ras_affine(first.image_position_patient, first.image_orientation_patient,  # type: ignore[arg-type]
                        first.pixel_spacing, step)  # type: ignore[arg-type]
    row_spacing, column_spacing = first.pixel_spacing  # type: ignore[misc]
    return CTVolume(hu=hu, affine=affine, spacing_mm=(column_spacing, row_spacing, spacing), headers=ordered,
                    reference=reference)
