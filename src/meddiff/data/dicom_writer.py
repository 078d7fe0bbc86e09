"""Write a synthetic CT volume as a DICOM CT Image Storage series, one file per slice.

Implements the CT Image IOD (DICOM PS3.3 A.3) with the modules a scanner writes: Patient, General
Study, General Series, Frame of Reference, General Equipment, General Image, Image Plane (C.7.6.2),
Image Pixel (C.7.6.3), CT Image (C.8.2.1), VOI LUT and SOP Common, encoded as Explicit VR Little
Endian files with a File Meta Information header (PS3.10). Stored values are
``(HU - RescaleIntercept) / RescaleSlope`` (PS3.3 C.11.1.1.2).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

#: UID root for everything the synthetic cohort writes (pydicom's documented root for generated UIDs)
UID_PREFIX = "1.2.826.0.1.3680043.8.498."


@dataclass(frozen=True)
class Scanner:
    """An acquisition site's CT scanner and how it stores pixels."""

    institution: str
    manufacturer: str
    model: str
    pixel_representation: int  # 0 = unsigned, 1 = two's complement (PS3.3 C.7.6.3.1)
    bits_stored: int
    rescale_slope: float
    rescale_intercept: float = -1024.0
    kvp: float = 120.0
    descending_instances: bool = False  # InstanceNumber 1 at the top of the head


@dataclass(frozen=True)
class StudyInfo:
    """Identifiers and dates of one patient's CT study."""

    patient_id: str
    patient_sex: str  # DICOM M / F / O
    patient_birth_date: str  # YYYYMMDD
    patient_age: str  # e.g. 067Y
    study_date: str  # YYYYMMDD
    study_time: str  # HHMMSS
    accession_number: str
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    patient_name: str = ""  # DICOM PN, Family^Given
    referring_physician_name: str = ""


def deterministic_uid(*entropy: object) -> str:
    """A valid DICOM UID (PS3.5 9) derived from ``entropy`` (same entropy, same UID)."""
    return generate_uid(prefix=UID_PREFIX, entropy_srcs=[str(part) for part in entropy])


def to_stored_values(volume_hu: np.ndarray, scanner: Scanner) -> np.ndarray:
    """Hounsfield units -> stored pixel values of the scanner's pixel representation."""
    stored = np.rint((volume_hu - scanner.rescale_intercept) / scanner.rescale_slope)
    if scanner.pixel_representation == 0:
        return np.clip(stored, 0, 2**scanner.bits_stored - 1).astype(np.uint16)
    limit = 2 ** (scanner.bits_stored - 1)
    return np.clip(stored, -limit, limit - 1).astype(np.int16)


def _series_template(info: StudyInfo, scanner: Scanner, rows: int, columns: int) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = info.study_date
    ds.SeriesDate = info.study_date
    ds.AcquisitionDate = info.study_date
    ds.ContentDate = info.study_date
    ds.StudyTime = info.study_time
    ds.SeriesTime = info.study_time
    ds.AcquisitionTime = info.study_time
    ds.ContentTime = info.study_time
    ds.AccessionNumber = info.accession_number
    ds.Modality = "CT"
    ds.Manufacturer = scanner.manufacturer
    ds.InstitutionName = scanner.institution
    ds.ReferringPhysicianName = info.referring_physician_name
    ds.StudyDescription = "CT HEAD WO CONTRAST"
    ds.SeriesDescription = "AXIAL BRAIN"
    ds.ManufacturerModelName = scanner.model
    ds.PatientName = info.patient_name or f"SYNTHETIC^{info.patient_id}"
    ds.PatientID = info.patient_id
    ds.PatientBirthDate = info.patient_birth_date
    ds.PatientSex = info.patient_sex
    ds.PatientAge = info.patient_age
    ds.BodyPartExamined = "HEAD"
    ds.KVP = f"{scanner.kvp:g}"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = info.study_instance_uid
    ds.SeriesInstanceUID = info.series_instance_uid
    ds.StudyID = info.accession_number[-8:]
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = info.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = scanner.bits_stored
    ds.HighBit = scanner.bits_stored - 1
    ds.PixelRepresentation = scanner.pixel_representation
    ds.WindowCenter = "40"
    ds.WindowWidth = "80"
    ds.RescaleIntercept = f"{scanner.rescale_intercept:g}"
    ds.RescaleSlope = f"{scanner.rescale_slope:g}"
    ds.RescaleType = "HU"
    return ds


def write_ct_series(
    series_dir: Path,
    volume_hu: np.ndarray,
    pixel_spacing_mm: float,
    slice_thickness_mm: float,
    first_position_lps: tuple[float, float, float],
    info: StudyInfo,
    scanner: Scanner,
    attributes: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write ``volume_hu`` (indexed ``[column, row, slice]``, axial, slices ascending in z).

    Files are named ``<InstanceNumber>.dcm``; slice ``k`` sits at ImagePositionPatient
    ``first_position_lps + k · SliceThickness · (0, 0, 1)`` (contiguous slices). ``attributes``
    (DICOM keyword → value) are set on every instance after the defaults, replacing them (e.g.
    ``ImageType`` ``DERIVED\\SECONDARY\\AXIAL`` for a derived series).

    Raises:
        ValueError: a key of ``attributes`` is not a DICOM keyword.
    """
    series_dir.mkdir(parents=True, exist_ok=True)
    columns, rows, n_slices = volume_hu.shape
    stored = to_stored_values(volume_hu, scanner)
    template = _series_template(info, scanner, rows, columns)
    template.PixelSpacing = [f"{pixel_spacing_mm:g}", f"{pixel_spacing_mm:g}"]
    template.SliceThickness = f"{slice_thickness_mm:g}"
    template.SpacingBetweenSlices = f"{slice_thickness_mm:g}"
    for keyword, value in (attributes or {}).items():
        if tag_for_keyword(keyword) is None:
            raise ValueError(f"attributes: {keyword!r} is not a DICOM keyword (PS3.6)")
        setattr(template, keyword, value)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"PYDICOM {pydicom.__version__}"[:16]
    template.file_meta = meta
    paths = []
    x0, y0, z0 = first_position_lps
    for k in range(n_slices):
        instance_number = n_slices - k if scanner.descending_instances else k + 1
        sop_instance_uid = deterministic_uid(info.series_instance_uid, "instance", k)
        z = z0 + k * slice_thickness_mm
        template.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
        template.SOPInstanceUID = sop_instance_uid
        template.InstanceNumber = instance_number
        template.ImagePositionPatient = [f"{x0:.2f}", f"{y0:.2f}", f"{z:.2f}"]
        template.SliceLocation = f"{z:.2f}"
        # DICOM pixel rows run along Y (posterior), columns along X: the frame is volume[:, :, k].T
        template.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        path = series_dir / f"{instance_number}.dcm"
        template.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
