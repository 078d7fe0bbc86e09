"""DICOM reading: slice order along the normal, rescale, geometry checks, RAS affine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.pixels import apply_rescale

from meddiff.data.cohort import MINORITY_SITE
from meddiff.data.dicom import SeriesError, SliceHeader, check_geometry, read_header, rescale_to_hu, sort_by_position
from meddiff.data.geometry import ras_affine, slice_normal

if TYPE_CHECKING:
    from tests.data.conftest import Pipeline


def _header(
    z: float, sop: str = "", orientation: tuple = (1, 0, 0, 0, 1, 0), spacing: tuple = (1.0, 1.0)
) -> SliceHeader:
    return SliceHeader(Path(f"{z}.dcm"), "P1", "1.2", "1.2.3", sop or f"1.2.3.{z}", "CT", None, (0.0, 0.0, z),
                       tuple(map(float, orientation)), spacing, 4, 4)


def test_slices_sort_by_position_on_the_normal_not_by_instance() -> None:
    headers = [_header(z) for z in (10.0, -5.0, 0.0, 5.0)]
    ordered, positions = sort_by_position(headers)
    assert [h.image_position_patient[2] for h in ordered] == [-5.0, 0.0, 5.0, 10.0]
    np.testing.assert_allclose(positions, [-5, 0, 5, 10])


def test_sorting_follows_an_oblique_normal() -> None:
    orientation = (1, 0, 0, 0, np.cos(0.3), -np.sin(0.3))
    normal = slice_normal(orientation)
    headers = [SliceHeader(Path(f"{k}.dcm"), "P1", "1.2", "1.2.3", f"1.2.3.{k}", "CT", None,
                           tuple(normal * k * 3.0), tuple(map(float, orientation)), (1.0, 1.0), 4, 4)
               for k in (2, 0, 3, 1)]
    ordered, spacing = check_geometry(headers)
    assert [h.sop_instance_uid for h in ordered] == ["1.2.3.0", "1.2.3.1", "1.2.3.2", "1.2.3.3"]
    assert spacing == pytest.approx(3.0)


@pytest.mark.parametrize(("headers", "reason"), [
    ([_header(0.0, sop="1.9"), _header(1.0, sop="1.9")], "duplicate_sop_instance"),
    ([_header(0.0), _header(1.0, orientation=(0, 1, 0, 0, 0, -1))], "mixed_orientation"),
    ([_header(0.0), _header(1.0), _header(3.0)], "inconsistent_spacing"),
    ([_header(0.0), _header(1.0, spacing=(2.0, 2.0))], "inconsistent_spacing"),
])
def test_bad_geometry_is_rejected_with_a_reason(headers: list[SliceHeader], reason: str) -> None:
    with pytest.raises(SeriesError) as caught:
        check_geometry(headers)
    assert caught.value.reason == reason


def test_rescale_matches_pydicom(raw_cohort: Path) -> None:
    patients = [json.loads(line) for line in (raw_cohort / "ehr" / "Patient.ndjson").read_text().splitlines()]
    for patient in patients[:2] + [p for p in patients if MINORITY_SITE in str(p["managingOrganization"])][:1]:
        files = sorted((raw_cohort / "imaging" / patient["id"]).rglob("*.dcm"))
        if not files:
            continue
        ds = pydicom.dcmread(files[0])
        expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_allclose(rescale_to_hu(ds), expected)
        np.testing.assert_allclose(rescale_to_hu(ds), apply_rescale(ds.pixel_array, ds))


def test_non_dicom_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    problem = read_header(path)
    assert getattr(problem, "reason", None) == "not_dicom"


def test_ingested_volume_is_sorted_and_georeferenced(
    raw_cohort: Path, pipeline: Pipeline, pseudonym_of: dict[str, str]
) -> None:
    """The minority site numbers instances top-down: ingest must still order slices bottom-up."""
    manifest = pd.read_parquet(pipeline.interim / "manifest.parquet")
    row = manifest[(manifest.site == MINORITY_SITE) & manifest.has_image].iloc[0]
    raw_id = {v: k for k, v in pseudonym_of.items()}[row.patient_id]
    files = sorted((raw_cohort / "imaging" / raw_id).rglob("*.dcm"))
    datasets = [pydicom.dcmread(f) for f in files]
    by_instance = sorted(datasets, key=lambda ds: int(ds.InstanceNumber))
    assert float(by_instance[0].ImagePositionPatient[2]) > float(by_instance[-1].ImagePositionPatient[2])
    by_position = sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))
    expected = np.stack([apply_rescale(ds.pixel_array, ds).T for ds in by_position], axis=-1)
    image = nib.load(pipeline.interim / row.image_path)
    np.testing.assert_allclose(np.asarray(image.dataobj), expected, atol=1e-4)
    lowest = by_position[0]
    affine = ras_affine(lowest.ImagePositionPatient, lowest.ImageOrientationPatient, lowest.PixelSpacing,
                        (0.0, 0.0, float(lowest.SliceThickness)))
    np.testing.assert_allclose(image.affine, affine, atol=1e-3)
    mask = nib.load(pipeline.interim / row.mask_path)
    np.testing.assert_allclose(mask.affine, image.affine, atol=1e-3)
