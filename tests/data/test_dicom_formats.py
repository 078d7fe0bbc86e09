"""DICOM decoding: pydicom's own test files (compressed, big endian, multi-frame), Enhanced CT, compression."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_rescale
from pydicom.sequence import Sequence
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless, RLELossless, generate_uid

from meddiff.data.dicom import SeriesError, load_series, read_file_headers, read_headers, read_pixels


def _testdata(name: str) -> str:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not shipped with this pydicom")
    return str(path)


#: file -> transfer syntax it exercises (all shipped inside pydicom, read offline)
SHIPPED = {
    "CT_small.dcm": "Explicit VR Little Endian, CT with rescale",
    "MR_small.dcm": "Explicit VR Little Endian",
    "MR_small_implicit.dcm": "Implicit VR Little Endian",
    "MR_small_bigendian.dcm": "Explicit VR Big Endian",
    "MR_small_RLE.dcm": "RLE Lossless",
    "MR_small_jp2klossless.dcm": "JPEG 2000 lossless",
    "MR_small_jpeg_ls_lossless.dcm": "JPEG-LS lossless",
    "JPGExtended.dcm": "JPEG Extended 12-bit (process 2/4)",
    "JPEG2000.dcm": "JPEG 2000",
    "693_J2KI.dcm": "JPEG 2000, CT with rescale",
    "JPEGLSNearLossless_16.dcm": "JPEG-LS near-lossless",
    "rtdose.dcm": "multi-frame (15 frames), Implicit VR",
    "rtdose_rle.dcm": "multi-frame RLE",
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_values_equal_pydicom_after_rescale(name: str) -> None:
    ds = pydicom.dcmread(_testdata(name))
    ours = read_pixels(ds)
    expected = apply_rescale(ds.pixel_array, ds).astype(np.float32).reshape(ours.shape)
    np.testing.assert_array_equal(ours, expected)
    assert ours.shape[0] == int(ds.get("NumberOfFrames") or 1)


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
                                  "MR_small_bigendian.dcm", "MR_small_implicit.dcm"])
def test_lossless_encodings_decode_to_the_same_values(name: str) -> None:
    reference = read_pixels(pydicom.dcmread(_testdata("MR_small.dcm")))
    np.testing.assert_array_equal(read_pixels(pydicom.dcmread(_testdata(name))), reference)


def test_colour_is_refused_but_every_jpeg_process_decodes() -> None:
    for name in ("SC_rgb_jpeg_gdcm.dcm", "SC_jpeg_no_color_transform.dcm"):  # JPEG lossless SV1, baseline
        ds = pydicom.dcmread(_testdata(name))
        assert ds.pixel_array.shape[-1] == 3  # the decoder plug-in is installed
        with pytest.raises(ValueError, match="only greyscale"):
            read_pixels(ds)


def test_greyscale_jpeg_baseline(tmp_path: Path) -> None:
    from PIL import Image

    ds = pydicom.dcmread(_testdata("CT_small.dcm"))
    grey = (np.clip(ds.pixel_array, 0, 2000) / 2000 * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="JPEG", quality=90)
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.save_as(tmp_path / "jpeg.dcm")
    again = pydicom.dcmread(tmp_path / "jpeg.dcm")
    np.testing.assert_array_equal(read_pixels(again)[0], apply_rescale(again.pixel_array, again).astype(np.float32))


def test_legacy_multiframe_frames_get_positions() -> None:
    headers = read_file_headers(Path(_testdata("rtdose.dcm")))
    ds = pydicom.dcmread(_testdata("rtdose.dcm"), stop_before_pixels=True)
    assert len(headers) == int(ds.NumberOfFrames) and [h.frame for h in headers] == list(range(15))
    z = [h.image_position_patient[2] for h in headers]
    np.testing.assert_allclose(np.diff(z), np.diff([float(v) for v in ds.GridFrameOffsetVector]))


def _cohort_series(raw_cohort: Path) -> list[Path]:
    """A main-site series (12-bit unsigned: every lossless codec can encode it)."""
    for series in sorted((raw_cohort / "imaging").glob("*/*/*")):
        files = sorted(series.glob("*.dcm"))
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        if ds.PixelRepresentation == 0 and len(files) >= 4:
            return files
    raise AssertionError("no main-site series")


def _enhanced_ct(files: list[Path], target: Path, syntax: str | None = None) -> Path:
    """The series as one Enhanced CT instance (PS3.3 A.38): per-frame Plane Position, shared groups."""
    slices = sorted((pydicom.dcmread(f) for f in files), key=lambda d: float(d.ImagePositionPatient[2]))
    ds = copy.deepcopy(slices[0])
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([Dataset()])
    shared.PixelMeasuresSequence[0].PixelSpacing = ds.PixelSpacing
    shared.PixelMeasuresSequence[0].SliceThickness = ds.SliceThickness
    shared.PlaneOrientationSequence = Sequence([Dataset()])
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = ds.ImageOrientationPatient
    shared.PixelValueTransformationSequence = Sequence([Dataset()])
    shared.PixelValueTransformationSequence[0].RescaleSlope = ds.RescaleSlope
    shared.PixelValueTransformationSequence[0].RescaleIntercept = ds.RescaleIntercept
    shared.PixelValueTransformationSequence[0].RescaleType = "HU"
    per_frame = []
    for s in slices:
        item = Dataset()
        item.PlanePositionSequence = Sequence([Dataset()])
        item.PlanePositionSequence[0].ImagePositionPatient = s.ImagePositionPatient
        per_frame.append(item)
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "RescaleSlope",
                    "RescaleIntercept", "SliceLocation", "InstanceNumber"):
        del ds[keyword]
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.NumberOfFrames = len(slices)
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = b"".join(s.PixelData for s in slices)
    if syntax is not None:
        ds.compress(syntax)
    ds.save_as(target, enforce_file_format=True)
    return target


@pytest.mark.parametrize("syntax", [None, RLELossless])
def test_enhanced_multiframe_equals_the_single_frame_series(raw_cohort: Path, tmp_path: Path,
                                                            syntax: str | None) -> None:
    files = _cohort_series(raw_cohort)
    single = load_series([h for h in read_headers(files)])
    frames = read_headers([_enhanced_ct(files, tmp_path / "enhanced.dcm", syntax)])
    assert len(frames) == len(files) and {h.frame for h in frames} == set(range(len(files)))
    multi = load_series(frames)
    np.testing.assert_array_equal(multi.hu, single.hu)
    np.testing.assert_allclose(multi.affine, single.affine, atol=1e-6)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_compressed_series_equal_the_uncompressed_one(raw_cohort: Path, tmp_path: Path, syntax: str) -> None:
    # OpenJPEG's default 6 resolution levels need >= 32 pixels a side: CT_small (128²) for JPEG 2000
    files = [Path(_testdata("CT_small.dcm"))] if syntax == JPEG2000Lossless else _cohort_series(raw_cohort)
    compressed = []
    for path in files:
        ds = pydicom.dcmread(path)
        ds.compress(syntax)
        compressed.append(tmp_path / path.name)
        ds.save_as(compressed[-1], enforce_file_format=True)
    assert pydicom.dcmread(compressed[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(load_series(read_headers(compressed)).hu, load_series(read_headers(files)).hu)


def test_localizer_and_missing_pixels_are_rejected(tmp_path: Path) -> None:
    root = Path(_testdata("dicomdirtests/DICOMDIR")).parent
    localizer = read_headers(sorted((root / "98892001" / "CT2N").iterdir()))
    with pytest.raises(SeriesError) as caught:
        load_series(localizer)
    assert caught.value.reason == "localizer"
    ds = pydicom.dcmread(_testdata("CT_small.dcm"))
    del ds.PixelData
    ds.save_as(tmp_path / "no_pixels.dcm")
    with pytest.raises(SeriesError) as caught:
        load_series(read_headers([tmp_path / "no_pixels.dcm"]))
    assert caught.value.reason == "missing_pixel_data"


def test_a_real_series_from_pydicom_matches_pydicom() -> None:
    """dicomdirtests 98892001/CT5N: 5 axial CT slices, file order ≠ position order."""
    root = Path(_testdata("dicomdirtests/DICOMDIR")).parent / "98892001" / "CT5N"
    files = sorted(root.iterdir())
    volume = load_series(read_headers(files))
    datasets = sorted((pydicom.dcmread(f) for f in files), key=lambda d: float(d.ImagePositionPatient[2]))
    expected = np.stack([apply_rescale(d.pixel_array, d).T for d in datasets], axis=-1)
    np.testing.assert_array_equal(volume.hu, expected.astype(np.float32))
    assert volume.spacing_mm[2] == pytest.approx(2.5)
    irregular = read_headers(sorted((root.parents[1] / "77654033" / "CT2").iterdir()))
    with pytest.raises(SeriesError) as caught:
        load_series(irregular)
    assert caught.value.reason == "inconsistent_spacing"
