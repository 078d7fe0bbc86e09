"""One mixed raw drop ingested once: real DICOM from pydicom, BraTS NIfTI, FHIR Bundle + DocumentReference,
MIMIC-IV CSV, symlinks and path tricks, and the remaining fault kinds (each quarantined with its reason)."""

from __future__ import annotations

import base64
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_rescale
from pydicom.uid import generate_uid

from meddiff.config import Params, params_from_dict
from meddiff.data.deid import Pseudonymizer, resolve_key

KEY = "test-key-for-the-mixed-drop-0123456789"
DICOMDIR_TESTS = Path(str(get_testdata_file("dicomdirtests/DICOMDIR", download=False))).parent


@dataclass(frozen=True)
class Drop:
    params: Params
    raw: Path
    interim: Path
    quarantine: list[dict]
    manifest: pd.DataFrame
    pseudo: Pseudonymizer
    report: dict

    def row(self, raw_id: str) -> pd.Series:
        return self.manifest.set_index("patient_id").loc[self.pseudo.pseudonym(raw_id)]

    def reasons(self, **match: str) -> set[str]:
        return {q["reason"] for q in self.quarantine if all(str(q.get(k)) .startswith(v) or v in str(q.get(k))
                                                          for k, v in match.items())}


def _patient(pid: str, **extra: object) -> dict:
    return {"resourceType": "Patient", "id": pid, "gender": "male", "birthDate": "1961-04-12",
            "managingOrganization": {"reference": "Organization/site_a"}, **extra}


def _condition(cid: str, pid: str, code: str) -> dict:
    return {"resourceType": "Condition", "id": cid, "subject": {"reference": f"Patient/{pid}"},
            "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": code}]}}


def _observation(oid: str, pid: str, loinc: str, value: object, unit: str) -> dict:
    return {"resourceType": "Observation", "id": oid, "subject": {"reference": f"Patient/{pid}"},
            "code": {"coding": [{"system": "http://loinc.org", "code": loinc}]},
            "valueQuantity": {"value": value, "unit": unit, "code": unit}}


def _document(did: str, pid: str, text: bytes, content_type: str = "text/plain") -> dict:
    return {"resourceType": "DocumentReference", "id": did, "status": "current",
            "subject": {"reference": f"Patient/{pid}"},
            "content": [{"attachment": {"contentType": content_type, "data": base64.b64encode(text).decode()}}]}


def _write_ct_variants(imaging: Path) -> None:
    """CT_small rewritten into small series that each carry one fault."""
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))

    def variant(folder: str, patient: str, series: str, sop: str, drop_pixels: bool = False) -> None:
        ds = source.copy()
        ds.PatientID, ds.SeriesInstanceUID, ds.SOPInstanceUID = patient, series, sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        if drop_pixels:
            del ds.PixelData
        target = imaging / folder
        target.mkdir(parents=True, exist_ok=True)
        ds.save_as(target / f"{sop[-6:]}.dcm", enforce_file_format=True)

    duplicate_series, duplicate_sop = generate_uid(), generate_uid()
    variant("DUP/a", "DUP", duplicate_series, duplicate_sop)
    variant("DUP/b", "DUP", duplicate_series, duplicate_sop)
    variant("NOPIX", "NOPIX", generate_uid(), generate_uid(), drop_pixels=True)
    mixed = generate_uid()
    variant("MIXED", "MIXED-1", mixed, generate_uid())
    variant("MIXED", "MIXED-2", mixed, generate_uid())


def _write_brats(imaging: Path, case: str, with_seg: bool = True) -> None:
    folder = imaging / case
    folder.mkdir(parents=True)
    affine = np.diag([-2.0, -2.0, 2.0, 1.0])
    rng = np.random.default_rng(0)
    for channel in ("t1", "t1ce", "t2", "flair"):
        nib.save(nib.Nifti1Image(rng.normal(300, 50, (8, 8, 6)).astype(np.float32), affine),
                 folder / f"{case}_{channel}.nii.gz")
    if with_seg:
        seg = np.zeros((8, 8, 6), dtype=np.uint8)
        seg[3:5, 3:5, 2:4] = 4
        seg[2, 2, 2] = 2
        nib.save(nib.Nifti1Image(seg, affine), folder / f"{case}_seg.nii.gz")


@pytest.fixture(scope="session")
def drop(tmp_path_factory: pytest.TempPathFactory) -> Drop:
    from meddiff.data.ingest import run_ingest

    root = tmp_path_factory.mktemp("mixed")
    raw = root / "raw"
    imaging, ehr, notes = raw / "imaging", raw / "ehr", raw / "notes"
    for folder in (imaging, ehr, notes):
        folder.mkdir(parents=True)
    # real DICOM shipped with pydicom: patient 98890234 has an axial CT (kept), a localizer, MR projections
    for name in ("CT5N", "CT2N"):
        shutil.copytree(DICOMDIR_TESTS / "98892001" / name, imaging / "98890234" / name)
    shutil.copytree(DICOMDIR_TESTS / "98892003" / "MR700", imaging / "98890234" / "MR700")
    shutil.copytree(DICOMDIR_TESTS / "77654033" / "CT2", imaging / "77654033" / "CT2")  # slice gap
    _write_ct_variants(imaging)
    _write_brats(imaging, "BraTS-001")
    _write_brats(imaging, "BraTS-002", with_seg=False)

    peter = _patient("98890234", name=[{"family": "Doe", "given": ["Peter"]}],
                     address=[{"line": ["27 Wexford Road"], "city": "Ridgemont", "postalCode": "40213"}])
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in (
        peter, _condition("c-peter", "98890234", "I63.9"),
        _observation("o-peter-wbc", "98890234", "6690-2", 7.5, "10*3/uL"),
        _observation("o-peter-nan", "98890234", "1988-5", float("nan"), "mg/L"),
        _document("d-peter", "98890234", b"Peter Doe seen 2023-05-02 at 27 Wexford Road: r/o CVA, L weakness."),
        _document("d-peter-pdf", "98890234", b"%PDF-1.4", content_type="application/pdf"),
        {"resourceType": "Encounter", "id": "e1"},
    )]}
    (ehr / "peter.json").write_text(json.dumps(bundle))
    (ehr / "broken.json").write_text("{not json")
    lines = {
        "Patient": [_patient("BraTS-001"), _patient("77654033"), _patient("..evil"), _patient("NOLABEL")],
        "Condition": [_condition("c-b1", "BraTS-001", "G06.0"), _condition("c-776", "77654033", "I61.9"),
                      _condition("c-evil", "..evil", "I61.9")],
        "Observation": [_observation("o-b1-glc", "BraTS-001", "2345-7", 99.0, "mg/dL"),
                        _observation("o-b1-unit", "BraTS-001", "6690-2", 7.0, "furlongs")],
        "DocumentReference": [_document("d-b1", "BraTS-001", "Fièvre, céphalée; r/o abscess.".encode("latin-1"))],
    }
    for resource, items in lines.items():
        (ehr / f"{resource}.ndjson").write_text("".join(json.dumps(item) + "\n" for item in items))
    (ehr / "patients.csv").write_text("subject_id,gender,anchor_age,anchor_year,anchor_year_group,dod\n"
                                      "10000032,F,52,2180,2014 - 2016,\n10000033,M,95,2130,2011 - 2013,\n")
    (ehr / "labevents.csv").write_text(
        "labevent_id,subject_id,hadm_id,itemid,charttime,value,valuenum,valueuom\n"
        "1,10000032,,51301,2180-05-06 22:25:00,7.5,7.5,K/uL\n"
        "2,10000032,,50931,2180-05-06 22:25:00,90,90,mg/dL\n"
        "3,10000032,,51237,2180-05-06 22:25:00,1.1,1.1,\n"
        "4,10000032,,50889,2180-05-06 22:25:00,12,12,mg/L\n"
        "5,10000033,,50931,2130-01-01 10:00:00,90,90,mg%\n"
        "6,10000033,,51301,2130-01-01 10:00:00,950,950,K/uL\n"
        "7,10000033,,51301,2130-01-01 10:00:00,___,,K/uL\n"
        "8,10000033,,99999,2130-01-01 10:00:00,1,1,U/L\n"
        "9,10000033,,51237,2130-01-01 10:00:00,1.3,1.3,\n")
    (ehr / "diagnoses_icd.csv").write_text("subject_id,hadm_id,seq_num,icd_code,icd_version\n"
                                           "10000032,1,1,I639,10\n10000033,2,1,4019,9\n10000033,2,2,I619,10\n")
    (notes / "10000033.txt").write_text("Seen 01/02/2130 by Dr. Hargrove. 95 year old M, h/o HTN, ICH on CT.\n")
    (notes / "10000032.txt").write_bytes(b"")
    (notes / "a..b.txt").write_text("a note with a path trick in its name")
    outside = root / "outside_secret.txt"
    outside.write_text("never copied")
    os.symlink(outside, notes / "link_out.txt")
    os.symlink(notes / "10000033.txt", notes / "link_in.txt")
    os.symlink(root, imaging / "linkdir")
    os.symlink(root / "missing.dcm", imaging / "dangling.dcm")

    params = params_from_dict({"ingest": {"allow_ephemeral_key_for_synthetic": False}})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDDIFF_DEID_KEY", KEY)
        run_ingest(params, raw, root / "interim", root / "quarantine", root / "report")
        key, _ = resolve_key("MEDDIFF_DEID_KEY", False, raw)
    quarantine = [json.loads(line) for line in (root / "quarantine" / "quarantine.jsonl").read_text().splitlines()]
    report = json.loads((root / "report" / "validation.json").read_text())
    return Drop(params, raw, root / "interim", quarantine, pd.read_parquet(root / "interim" / "manifest.parquet"),
                Pseudonymizer(key), report)


def test_counts_add_up_and_the_right_patients_are_kept(drop: Drop) -> None:
    assert drop.report["records_in"] == drop.report["accepted"] + drop.report["quarantined"]
    expected = {drop.pseudo.pseudonym(p) for p in ("98890234", "BraTS-001", "10000032", "10000033")}
    assert set(drop.manifest.patient_id) == expected
    assert drop.report["ignored_bundle_entries"] == {"Encounter": 1}


def test_real_pydicom_series_is_read_and_the_others_rejected(drop: Drop) -> None:
    row = drop.row("98890234")
    assert row.has_image and row.label == "ischemic_stroke"
    files = sorted((DICOMDIR_TESTS / "98892001" / "CT5N").iterdir())
    datasets = sorted((pydicom.dcmread(f) for f in files), key=lambda d: float(d.ImagePositionPatient[2]))
    expected = np.stack([apply_rescale(d.pixel_array, d).T for d in datasets], axis=-1)
    np.testing.assert_array_equal(np.asarray(nib.load(drop.interim / row.image_path).dataobj), expected)
    assert drop.reasons(source="imaging/98890234/CT2N") == {"localizer"}
    # MR is read (ingest.accepted_modalities), but MR700 holds projection images in seven orientations
    assert drop.reasons(source="imaging/98890234/MR700") == {"mixed_orientation"}
    assert drop.reasons(source="imaging/77654033/CT2") == {"inconsistent_spacing"}


def test_every_dicom_fault_kind(drop: Drop) -> None:
    assert drop.reasons(kind="image_series", patient_id="DUP") == {"duplicate_sop_instance"}
    assert drop.reasons(kind="image_series", patient_id="NOPIX") == {"missing_pixel_data"}
    assert drop.reasons(kind="image_series", source="imaging/MIXED") == {"inconsistent_patient"}
    assert drop.reasons(record_id="file/broken.json") | drop.reasons(source="ehr/broken.json") == {"invalid_json"}


def test_brats_case_becomes_image_and_mask(drop: Drop) -> None:
    row = drop.row("BraTS-001")
    assert row.has_image and row.label == "brain_abscess" and isinstance(row.mask_path, str)
    flair = nib.load(drop.raw / "imaging" / "BraTS-001" / "BraTS-001_flair.nii.gz")
    image, mask = nib.load(drop.interim / row.image_path), nib.load(drop.interim / row.mask_path)
    np.testing.assert_allclose(np.asarray(image.dataobj), flair.get_fdata(), rtol=1e-6)
    np.testing.assert_allclose(image.affine, flair.affine)
    assert set(np.unique(np.asarray(mask.dataobj)).tolist()) == {0, 1} and np.asarray(mask.dataobj).sum() == 9
    assert drop.reasons(source="imaging/BraTS-002") == {"incomplete_case"}


def test_fhir_bundle_document_reference_and_labs(drop: Drop) -> None:
    peter = drop.row("98890234")
    assert peter.wbc == pytest.approx(7.5) and np.isnan(peter.crp)
    assert "r/o CVA" in peter.note and "Peter" not in peter.note and "Wexford" not in peter.note
    assert "2023-05-02" not in peter.note
    assert drop.reasons(record_id="Observation/o-peter-nan") == {"missing_field"}  # NaN value
    assert drop.reasons(record_id="DocumentReference/d-peter-pdf") == {"unsupported_format"}
    assert drop.reasons(record_id="DocumentReference/d-b1") == {"not_utf8"}
    assert drop.reasons(record_id="Observation/o-b1-unit") == {"unknown_unit"}
    assert drop.row("BraTS-001").glucose == pytest.approx(99.0 / 18.016, rel=1e-3)


def test_mimic_csv_labs_are_harmonised(drop: Drop) -> None:
    first, second = drop.row("10000032"), drop.row("10000033")
    assert first.sex == "female" and first.age == 52 and first.site == "mimic_iv" and first.label == "ischemic_stroke"
    assert first.wbc == pytest.approx(7.5) and first.glucose == pytest.approx(90 / 18.016, rel=1e-4)
    assert first.inr == pytest.approx(1.1) and first.crp == pytest.approx(12.0) and not first.has_note
    assert second.age == 90, "ages over 89 are aggregated"
    assert second.label == "intracerebral_hemorrhage" and second.inr == pytest.approx(1.3)
    assert "Hargrove" not in second.note and "2130" not in second.note and "90+" in second.note
    reasons = {q["source"].split(":")[1]: q["reason"] for q in drop.quarantine if q["source"].startswith("ehr/lab")}
    assert reasons == {"6": "unknown_unit", "7": "out_of_range", "8": "missing_field", "9": "unknown_code"}
    assert drop.reasons(source="ehr/diagnoses_icd.csv:3") == {"unknown_code"}  # ICD-9 is not mapped
    assert drop.reasons(source="notes/10000032.txt") == {"note_too_short"}


def test_symlinks_and_path_tricks_are_quarantined_never_followed(drop: Drop, tmp_path: Path) -> None:
    for name in ("notes/link_out.txt", "notes/link_in.txt", "imaging/linkdir", "imaging/dangling.dcm",
                 "notes/a..b.txt"):
        matches = [q for q in drop.quarantine if q["source"] == name]
        assert matches and matches[0]["reason"] == "unsafe_path" and matches[0]["copies"] == [], name
    assert "outside" in next(q for q in drop.quarantine if q["source"] == "notes/link_out.txt")["message"]
    copied = [p.name for p in (drop.interim.parent / "quarantine").rglob("*")]
    assert "link_out.txt" not in copied and "outside_secret.txt" not in copied
    assert drop.reasons(record_id="Patient/..evil") == {"invalid_id"}


def test_patients_without_modality_or_label(drop: Drop) -> None:
    assert drop.reasons(record_id="Patient/77654033") == {"no_modality"}
    assert drop.reasons(record_id="Patient/NOLABEL") == {"missing_label"}


def test_no_identifier_of_the_mixed_drop_reaches_interim(drop: Drop) -> None:
    secrets = ["98890234", "Doe^Peter", "Peter", "Wexford", "40213", "10000032", "10000033", "BraTS-001",
               "1961-04-12", "Hargrove", "77654033"]
    for path in sorted(p for p in drop.interim.rglob("*") if p.is_file()):
        if path.suffix == ".parquet":
            text = pd.read_parquet(path).to_csv()
        else:
            data = path.read_bytes()
            text = (__import__("gzip").decompress(data) if path.suffix == ".gz" else data).decode("latin-1")
        assert not [s for s in secrets if s in text], path.name
