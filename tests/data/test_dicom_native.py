"""The native-pixel fast path of series assembly (issue 14): a plain 16-bit little-endian frame is read
straight from the file with the values ``pydicom``'s ``pixel_array`` gives (unused high bits masked or
sign-extended, then rescaled); anything else is left to pydicom; a series assembles to the same volume
either way."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, generate_uid

from meddiff.data.dicom import SliceHeader, _read_native_frame, load_series, read_file_headers, read_pixels

ROWS, COLUMNS = 6, 5


def _write_slice(path: Path, z: float, values: np.ndarray, *, signed: bool, bits_stored: int = 16,
                 syntax: str = ExplicitVRLittleEndian, series: str = "1.2.826.0.1.3680043.8.498.7",
                 trailing: bool = False) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.6", series
    ds.PatientID, ds.PatientName, ds.Modality = "P1", "Doe^Jane", "CT"
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, z], [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing, ds.SliceThickness = [0.5, 0.5], "2.0 "
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = ROWS, COLUMNS, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, int(signed)
    ds.RescaleSlope, ds.RescaleIntercept = "1.5 ", "-1024"
    ds.PixelData = values.astype("<i2" if signed else "<u2").tobytes()
    if trailing:
        ds.add_new(0xFFFCFFFC, "OB", b"\x00\x00")  # Data Set Trailing Padding after the pixel data
    ds.save_as(path, enforce_file_format=True, implicit_vr=syntax == ImplicitVRLittleEndian)
    return path


def _only_header(path: Path) -> SliceHeader:
    (header,) = read_file_headers(path)  # type: ignore[misc]
    return header


RNG = np.random.default_rng(14)


@pytest.mark.parametrize(("signed", "bits_stored", "syntax", "values"), [
    (True, 16, ExplicitVRLittleEndian, RNG.integers(-2000, 3000, (ROWS, COLUMNS))),
    (False, 12, ExplicitVRLittleEndian, RNG.integers(0, 4096, (ROWS, COLUMNS)) | 0xA000),  # junk in unused bits
    (True, 12, ExplicitVRLittleEndian, RNG.integers(-2048, 2048, (ROWS, COLUMNS)) & 0x0FFF),  # 12-bit two's compl.
    (False, 16, ImplicitVRLittleEndian, RNG.integers(0, 65535, (ROWS, COLUMNS))),
])
def test_native_frame_equals_pydicom(tmp_path: Path, signed: bool, bits_stored: int, syntax: str,
                                     values: np.ndarray) -> None:
    path = _write_slice(tmp_path / "a.dcm", 0.0, values, signed=signed, bits_stored=bits_stored, syntax=syntax)
    header = _only_header(path)
    assert header.pixels is not None and header.pixels.bits_stored == bits_stored
    expected = read_pixels(pydicom.dcmread(path))
    native = _read_native_frame(header)
    assert native is not None and native.dtype == expected.dtype
    np.testing.assert_array_equal(native, expected)


def test_other_layouts_are_left_to_pydicom(tmp_path: Path) -> None:
    values = RNG.integers(0, 4000, (ROWS, COLUMNS))
    trailing = _write_slice(tmp_path / "trailing.dcm", 0.0, values, signed=False, trailing=True)
    assert _only_header(trailing).pixels is None, "an element after the pixel data: pydicom reads the file"
    compressed = pydicom.dcmread(_write_slice(tmp_path / "plain.dcm", 0.0, values, signed=False))
    compressed.compress(RLELossless, encoding_plugin="pydicom")
    compressed.save_as(tmp_path / "rle.dcm")
    assert _only_header(tmp_path / "rle.dcm").pixels is None
    eight = pydicom.dcmread(tmp_path / "plain.dcm")
    eight.BitsAllocated, eight.BitsStored, eight.HighBit = 8, 8, 7
    eight.PixelData = values.astype(np.uint8).tobytes() + b"\x00" * (ROWS * COLUMNS % 2)
    eight.save_as(tmp_path / "eight.dcm")
    assert _only_header(tmp_path / "eight.dcm").pixels is None
    two_slopes = pydicom.dcmread(tmp_path / "plain.dcm")
    two_slopes.RescaleSlope = ["1", "2"]  # unreadable as one number: pydicom's path keeps reporting it
    two_slopes.save_as(tmp_path / "two_slopes.dcm")
    assert _only_header(tmp_path / "two_slopes.dcm").pixels is None


def test_a_series_assembles_to_the_same_volume_either_way(tmp_path: Path) -> None:
    headers = [_only_header(_write_slice(tmp_path / f"{k}.dcm", 2.0 * k, RNG.integers(0, 4096, (ROWS, COLUMNS)) |
                                         0x3000, signed=False, bits_stored=12)) for k in range(4)]
    assert all(h.pixels is not None for h in headers)
    fast = load_series(headers)
    slow = load_series([dataclasses.replace(h, pixels=None) for h in headers])
    np.testing.assert_array_equal(fast.hu, slow.hu)
    np.testing.assert_array_equal(fast.affine, slow.affine)
    assert fast.reference.to_json_dict() == slow.reference.to_json_dict()
    assert fast.hu.max() < 4096 * 1.5 - 1024 + 1, "the junk bits above BitsStored were masked"


def test_a_file_cut_after_the_header_scan_falls_back_to_pydicom(tmp_path: Path) -> None:
    path = _write_slice(tmp_path / "a.dcm", 0.0, RNG.integers(0, 4000, (ROWS, COLUMNS)), signed=False)
    header = _only_header(path)
    path.write_bytes(path.read_bytes()[:-4])
    assert _read_native_frame(header) is None
