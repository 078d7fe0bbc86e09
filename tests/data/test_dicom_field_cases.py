"""DICOM as scanners and archives really write it (issue 15): each kind read leniently with the right
values, or quarantined with a reason that quotes the problem; never an exception out of the reader.

Series are built from ``CT_small.dcm`` / ``MR_small.dcm`` shipped with pydicom, rewritten into small
stacks; the expected values come from pydicom itself (``apply_rescale``) or from the geometry written.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.pixels import apply_rescale
from pydicom.tag import Tag
from pydicom.uid import generate_uid

from meddiff.data.deid import Pseudonymizer, deidentify_dataset, person_names
from meddiff.data.dicom import (
    FileProblem,
    SeriesError,
    SliceHeader,
    load_series,
    read_file_headers,
    read_headers,
)
from meddiff.data.ingest.imaging import is_orthogonal, save_nifti

STEP_MM = 5.0


def _source(name: str = "CT_small.dcm") -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file(name, download=False))


def write_series(folder: Path, n: int = 4, name: str = "CT_small.dcm", step: np.ndarray | None = None,
                 mutate=None) -> list[Path]:
    """``n`` slices of a pydicom test file stacked along the normal (or along ``step``, LPS mm)."""
    source = _source(name)
    folder.mkdir(parents=True, exist_ok=True)
    orientation = np.array([float(v) for v in source.ImageOrientationPatient])
    normal = np.cross(orientation[:3], orientation[3:])
    vector = STEP_MM * normal if step is None else np.asarray(step, dtype=float)
    origin = np.array([float(v) for v in source.ImagePositionPatient])
    series, study = generate_uid(), generate_uid()
    paths = []
    for k in range(n):
        ds = copy.deepcopy(source)
        ds.SeriesInstanceUID, ds.StudyInstanceUID = series, study
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in origin + k * vector]
        ds.SliceThickness = f"{STEP_MM:.1f}"
        ds.PixelData = (ds.pixel_array + k).astype(ds.pixel_array.dtype).tobytes()
        if mutate is not None:
            ds = mutate(ds, k) or ds
        paths.append(folder / f"{k:03d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def reference_hu(paths: list[Path]) -> np.ndarray:
    datasets = [pydicom.dcmread(p) for p in paths]
    normal = np.cross(*np.reshape([float(v) for v in datasets[0].ImageOrientationPatient], (2, 3)))
    datasets.sort(key=lambda d: float(np.dot([float(v) for v in d.ImagePositionPatient], normal)))
    return np.stack([apply_rescale(d.pixel_array, d).astype(np.float32).T for d in datasets], axis=-1)


def _raw(keyword: str, vr: str, text: str) -> RawDataElement:
    value = text.encode("latin-1", errors="replace")
    value += b" " if len(value) % 2 else b""
    return RawDataElement(Tag(keyword), vr, len(value), value, 0, False, True)


# ------------------------------------------------------------------------------ decimal strings


@pytest.mark.parametrize("keyword", ["SliceThickness", "PixelSpacing", "RescaleSlope"])
def test_decimal_comma_is_read_as_a_decimal_point(tmp_path: Path, keyword: str) -> None:
    def comma(ds: pydicom.Dataset, k: int) -> None:
        text = "\\".join(str(v) for v in (ds[keyword].value if ds[keyword].VM > 1 else [ds[keyword].value]))
        ds[keyword] = _raw(keyword, "DS", text.replace(".", ",") if "." in text else text + ",0")

    clean = write_series(tmp_path / "clean")
    volume = load_series(read_headers(write_series(tmp_path / "comma", mutate=comma)))
    expected = load_series(read_headers(clean))
    np.testing.assert_array_equal(volume.hu, expected.hu)
    np.testing.assert_allclose(volume.affine, expected.affine)
    assert volume.spacing_mm == pytest.approx(expected.spacing_mm)


def test_a_bad_geometry_value_quarantines_the_file_quoting_it(tmp_path: Path) -> None:
    def bad(ds: pydicom.Dataset, k: int) -> None:
        if k == 1:
            ds["ImagePositionPatient"] = _raw("ImagePositionPatient", "DS", "-16.0\\abc\\12.5")

    paths = write_series(tmp_path / "s", mutate=bad)
    problem = read_file_headers(paths[1])
    assert isinstance(problem, FileProblem) and problem.reason == "invalid_header_value"
    assert "'-16.0\\\\abc\\\\12.5'" in problem.message or "abc" in problem.message
    assert all(isinstance(read_file_headers(p), list) for p in (paths[0], paths[2]))


def test_a_bad_value_nobody_needs_is_emptied_not_fatal(tmp_path: Path) -> None:
    def bad(ds: pydicom.Dataset, k: int) -> None:
        ds["SliceThickness"] = _raw("SliceThickness", "DS", "thick")
        ds["InstanceNumber"] = _raw("InstanceNumber", "IS", "1.0" if k == 0 else "n/a")

    paths = write_series(tmp_path / "s", mutate=bad)
    volume = load_series(read_headers(paths))
    np.testing.assert_array_equal(volume.hu, reference_hu(write_series(tmp_path / "clean")))
    assert volume.headers[0].instance_number == 1 and volume.headers[1].instance_number is None


# ----------------------------------------------------------------- PS3.10 header, DICOMDIR, truncation


def test_bare_implicit_data_set_without_preamble_is_read_like_pydicom_force(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "s")
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.preamble = None
        del ds.file_meta
        ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert paths[0].read_bytes()[128:132] != b"DICM"
    expected = []
    for path in sorted(paths):
        ds = pydicom.dcmread(path, force=True)
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        expected.append((float(ds.ImagePositionPatient[2]), apply_rescale(ds.pixel_array, ds).astype(np.float32).T))
    volume = load_series(read_headers(paths))
    np.testing.assert_array_equal(volume.hu, np.stack([e for _, e in sorted(expected, key=lambda x: x[0])], -1))


def test_text_file_stays_not_dicom_and_dicomdir_is_a_media_directory(tmp_path: Path) -> None:
    log = tmp_path / "export_log.txt"
    log.write_text("scanner export log for accession 123: 1 series sent\n")
    assert read_file_headers(log).reason == "not_dicom"  # type: ignore[union-attr]
    dicomdir = Path(get_testdata_file("DICOMDIR", download=False))
    problem = read_file_headers(dicomdir)
    assert isinstance(problem, FileProblem) and problem.reason == "media_directory"
    renamed = tmp_path / "index.dcm"  # recognised by its SOP class too, whatever its name
    renamed.write_bytes(dicomdir.read_bytes())
    assert read_file_headers(renamed).reason == "media_directory"  # type: ignore[union-attr]


def test_truncation_is_the_reason_even_when_the_series_also_has_a_gap(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "s", n=6)
    paths[4].unlink()  # a missing slice: inconsistent_spacing on its own
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[: int(len(data) * 0.7)])  # half of the pixel data arrived
    headers = read_headers([p for p in paths if p.exists()])
    with pytest.raises(SeriesError) as caught:
        load_series([h for h in headers if isinstance(h, SliceHeader)])
    assert caught.value.reason == "truncated_dicom" and paths[2].name in caught.value.message
    paths[3].write_bytes(paths[3].read_bytes()[:400])  # cut inside the header, before the series UID
    problem = read_file_headers(paths[3])
    assert isinstance(problem, FileProblem) and problem.reason == "truncated_dicom"


# ------------------------------------------------------------------------- localizer, tilt, rescale


def test_localizer_inside_an_axial_series_is_dropped_and_the_volume_kept(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "s", n=4)
    scout = pydicom.dcmread(paths[0])
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    scout.SOPInstanceUID = scout.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    scout.save_as(tmp_path / "s" / "scout.dcm", enforce_file_format=True)
    volume = load_series(read_headers(sorted((tmp_path / "s").iterdir())))
    assert volume.hu.shape[2] == 4 and {h.path for h in volume.headers} == set(paths)
    np.testing.assert_array_equal(volume.hu, reference_hu(paths))
    only_scouts = read_headers([tmp_path / "s" / "scout.dcm"])
    with pytest.raises(SeriesError) as caught:
        load_series(only_scouts)  # type: ignore[arg-type]
    assert caught.value.reason == "localizer"


def test_gantry_tilt_is_desheared_with_one_geometry_for_every_reader(tmp_path: Path) -> None:
    """15° tilt: slice plane rotated about x, table step 6 mm straight along z (a sheared stack). Each
    slice holds a ramp of 10 per row spacing along the world position on the slice plane's column axis
    Y, so the de-sheared voxel (i, j, k), which lies at j·Δr along Y, must read 10·j (linear resampling
    of a linear ramp is exact; the stored values are rounded to 0.5)."""
    tilt = np.deg2rad(15.0)
    row_cos, col_cos = np.array([1.0, 0, 0]), np.array([0, np.cos(tilt), np.sin(tilt)])
    spacing = float(_source().PixelSpacing[0])
    n_rows, table_step = int(_source().Rows), 6.0
    drift_rows = table_step * np.sin(tilt) / spacing  # each slice origin moves this far along Y, in rows

    def tilted(ds: pydicom.Dataset, k: int) -> None:
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row_cos, *col_cos)]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in (0.0, 0.0, table_step * k)]
        ds.RescaleSlope, ds.RescaleIntercept = "1", "0"
        ramp = 10.0 * (np.arange(n_rows)[:, None] + k * drift_rows) * np.ones((1, int(ds.Columns)))
        ds.PixelData = np.round(ramp).astype(np.int16).tobytes()

    volume = load_series(read_headers(write_series(tmp_path / "s", n=4, mutate=tilted)))
    assert is_orthogonal(volume.affine)
    assert volume.spacing_mm[2] == pytest.approx(table_step * np.cos(tilt), rel=1e-4)
    for k in range(4):
        rows = np.arange(int(np.ceil(k * drift_rows)) + 1, n_rows - 1)
        np.testing.assert_allclose(volume.hu[5, rows, k], 10.0 * rows, atol=0.51)
    target = tmp_path / "tilt.nii.gz"
    save_nifti(volume.hu, volume.affine, target)
    header = nib.load(target).header
    assert int(header["qform_code"]) == int(header["sform_code"]) == 1
    np.testing.assert_allclose(header.get_qform(), header.get_sform(), atol=1e-4)


def test_a_sheared_affine_gets_no_contradicting_qform(tmp_path: Path) -> None:
    sheared = np.array([[1.0, 0, 0, 0], [0, 1.0, 0.3, 0], [0, 0, 1.0, 0], [0, 0, 0, 1]])
    save_nifti(np.zeros((2, 2, 2), np.float32), sheared, tmp_path / "s.nii.gz")
    header = nib.load(tmp_path / "s.nii.gz").header
    assert int(header["qform_code"]) == 0 and int(header["sform_code"]) == 1


def test_per_slice_rescale_is_applied_per_file(tmp_path: Path) -> None:
    def rescale(ds: pydicom.Dataset, k: int) -> None:
        ds.RescaleSlope, ds.RescaleIntercept = ("1", "-1024") if k < 2 else ("0.5", "-1000")

    paths = write_series(tmp_path / "s", mutate=rescale)
    np.testing.assert_array_equal(load_series(read_headers(paths)).hu, reference_hu(paths))


# -------------------------------------------------------------------------------------- MR series


def test_mr_series_from_pydicom_mr_small_is_assembled(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "mr", n=3, name="MR_small.dcm")
    headers = read_headers(paths)
    assert {h.modality for h in headers} == {"MR"}
    volume = load_series(headers)
    np.testing.assert_array_equal(volume.hu, reference_hu(paths))
    assert volume.spacing_mm[2] == pytest.approx(STEP_MM)


# -------------------------------------------------------------------------------------------- PHI


def test_names_in_any_charset_and_nested_earlier_values_are_removed(tmp_path: Path) -> None:
    ds = _source()
    del ds.SpecificCharacterSet
    name = "Ørnsbjerg^Søren".encode() + b" "  # UTF-8 bytes, no Specific Character Set: read as Latin-1
    ds["PatientName"] = RawDataElement(Tag("PatientName"), "PN", len(name), name, 0, False, True)
    earlier = pydicom.Dataset()
    earlier.PatientName, earlier.PatientID = "Earlier^Name", "OLD-ID-77"
    modified = pydicom.Dataset()
    modified.ModifiedAttributesSequence = [earlier]
    ds.OriginalAttributesSequence = [modified]
    referenced = pydicom.Dataset()
    referenced.PatientID = "NESTED-ID-88"
    ds.SourceImageSequence = [referenced]
    ds.ClinicalTrialSubjectID = "Søren O."
    names = person_names(ds)
    assert "Ørnsbjerg" in names and "Søren" in names and "Earlier" in names
    deidentify_dataset(ds, Pseudonymizer(b"k" * 32), "PID-1", names)
    text = json.dumps(ds.to_json_dict(bulk_data_threshold=64, bulk_data_element_handler=lambda _: ""),
                      ensure_ascii=False)
    for secret in ("Ørnsbjerg", "Søren", "Ã\x98rnsbjerg", "Earlier", "OLD-ID-77", "NESTED-ID-88", "PID-1"):
        assert secret not in text, secret
    assert "OriginalAttributesSequence" not in ds and "ClinicalTrialSubjectID" not in ds


# ------------------------------------------------------------------------------- property-based

#: header values that change what is read (essential) and values nobody reads (emptied when bad)
MUTABLE = {"PixelSpacing": ("DS", 2), "ImagePositionPatient": ("DS", 3), "RescaleSlope": ("DS", 1),
           "RescaleIntercept": ("DS", 1), "SliceThickness": ("DS", 1), "InstanceNumber": ("IS", 1)}
ESSENTIAL = {"PixelSpacing", "ImagePositionPatient", "RescaleSlope", "RescaleIntercept"}
_number_text = st.one_of(
    st.floats(min_value=0.25, max_value=4.0, allow_nan=False).map(lambda v: f"{v:.3f}"),
    st.floats(min_value=0.25, max_value=4.0, allow_nan=False).map(lambda v: f"{v:.3f}".replace(".", ",")),
    st.text(alphabet="0123456789.,-+eE abc", min_size=0, max_size=8),
)


def _expected_number(text: str) -> float | None:
    """The test's own reading of a DS value: a plain decimal, or one with a single decimal comma."""
    stripped = text.strip()
    if stripped.count(",") == 1 and "." not in stripped:
        stripped = stripped.replace(",", ".")
    try:
        value = float(stripped)
    except ValueError:
        return None
    return value if np.isfinite(value) else None


@settings(max_examples=25, deadline=3000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(keyword=st.sampled_from(sorted(MUTABLE)), values=st.lists(_number_text, min_size=3, max_size=3))
def test_mutated_header_is_quarantined_with_its_value_or_read_right(tmp_path_factory: pytest.TempPathFactory,
                                                                    keyword: str, values: list[str]) -> None:
    vr, vm = MUTABLE[keyword]
    folder = tmp_path_factory.mktemp("mutated")
    text = "\\".join(values[:vm])
    originals: dict[int, object] = {}

    def mutate(ds: pydicom.Dataset, k: int) -> None:
        if k == 1:
            originals[k] = ds[keyword].value
            ds[keyword] = _raw(keyword, vr, text)

    paths = write_series(folder, n=3, mutate=mutate)
    try:
        headers = read_headers(paths)
        problems = [h for h in headers if isinstance(h, FileProblem)]
        if problems:
            assert problems[0].reason == "invalid_header_value" and problems[0].message
            return
        volume = load_series(headers)  # type: ignore[arg-type]
    except SeriesError as error:
        assert error.reason and error.message
        return
    parsed = [_expected_number(v) for v in values[:vm]]
    if keyword in ("RescaleSlope", "RescaleIntercept") and not text.strip():
        parsed = [1.0 if keyword == "RescaleSlope" else 0.0]  # an empty value is read as the identity LUT
    if keyword in ESSENTIAL:
        assert None not in parsed, f"{keyword} {text!r} was accepted"
    if keyword in ("RescaleSlope", "RescaleIntercept") and None not in parsed:
        ds = pydicom.dcmread(paths[1])
        slope = parsed[0] if keyword == "RescaleSlope" else float(ds.get("RescaleSlope", 1) or 1)
        intercept = parsed[0] if keyword == "RescaleIntercept" else float(ds.RescaleIntercept)
        position = [h.path for h in volume.headers].index(paths[1])
        stored = ds.pixel_array.astype(np.float32)
        np.testing.assert_allclose(volume.hu[:, :, position], (stored * np.float32(slope) + np.float32(intercept)).T,
                                   rtol=1e-5, atol=1e-3)
    elif keyword in ("SliceThickness", "InstanceNumber"):
        np.testing.assert_array_equal(volume.hu, reference_hu(paths))
