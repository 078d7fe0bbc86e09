"""Ingest end to end on real DICOM shipped with pydicom (issue 15): MR series are accepted with MR
intensity handling, Patients without managingOrganization are accepted with an unknown site, a patient
with a CT and an MR keeps the CT (the first of ``ingest.accepted_modalities``), one bad header value or
DICOMDIR never stops the stage, and no name reaches ``interim``."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from pydicom.data import get_testdata_file

from meddiff.config import params_from_dict
from meddiff.data.deid import Pseudonymizer
from meddiff.data.transforms import MR_LOWER_PERCENTILE, MR_UPPER_PERCENTILE, MRPercentileScaled


def _dicom_builders() -> ModuleType:
    """The series builders of ``test_dicom_field_cases.py`` (tests are not a package: loaded by path)."""
    path = Path(__file__).with_name("test_dicom_field_cases.py")
    spec = importlib.util.spec_from_file_location("dicom_field_case_builders", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_builders = _dicom_builders()
_raw, reference_hu, write_series = _builders._raw, _builders.reference_hu, _builders.write_series

KEY = "test-key-for-the-field-case-drop-0123456789"


@dataclass(frozen=True)
class Run:
    raw: Path
    interim: Path
    manifest: pd.DataFrame
    quarantine: list[dict]
    report: dict
    pseudo: Pseudonymizer
    mr_files: list[Path]
    ct_files: list[Path]

    def row(self, raw_id: str) -> pd.Series:
        return self.manifest.set_index("patient_id").loc[self.pseudo.pseudonym(raw_id)]

    def reasons(self, source: str) -> set[str]:
        return {q["reason"] for q in self.quarantine if q["source"].startswith(source)}


def _patient(pid: str, **extra: object) -> dict:
    return {"resourceType": "Patient", "id": pid, "gender": "female", "birthDate": "1957-07", **extra}


def _condition(pid: str, code: str) -> dict:
    return {"resourceType": "Condition", "id": f"c-{pid}", "subject": {"reference": f"Patient/{pid}"},
            "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": code}]}}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    from meddiff.data.ingest import run_ingest

    root = tmp_path_factory.mktemp("field")
    raw = root / "raw"
    imaging = raw / "imaging"

    def as_patient(pid: str, name: str):
        def mutate(ds, k):
            ds.PatientID, ds.PatientName = pid, name
        return mutate

    mr_files = write_series(imaging / "MRP1" / "mr", n=4, name="MR_small.dcm",
                            mutate=as_patient("MRP1", "Quill^Odile"))
    ct_files = write_series(imaging / "CTP1" / "ct", n=4, mutate=as_patient("CTP1", "Brann^Lis"))
    write_series(imaging / "BOTH" / "ct", n=3, mutate=as_patient("BOTH", "Varn^Ysol"))
    write_series(imaging / "BOTH" / "mr", n=3, name="MR_small.dcm", mutate=as_patient("BOTH", "Varn^Ysol"))

    def bad_spacing(ds, k):
        ds.PatientID, ds.PatientName = "BADV", "Ashgrove^Florian"
        ds["PixelSpacing"] = _raw("PixelSpacing", "DS", "0.66\\n/a")

    write_series(imaging / "BADV" / "ct", n=3, mutate=bad_spacing)
    (imaging / "CTP1" / "DICOMDIR").write_bytes(Path(get_testdata_file("DICOMDIR", download=False)).read_bytes())
    ehr = raw / "ehr"
    ehr.mkdir(parents=True)
    patients = [_patient("MRP1", name=[{"family": ["Quill"], "given": "Odile"}]),  # no managingOrganization
                _patient("CTP1", birthDate="1957"),
                _patient("BOTH", managingOrganization={"reference": "Organization/site_a"}),
                _patient("BADV")]
    conditions = [_condition("MRP1", "G060"), _condition("CTP1", "I639"), _condition("BOTH", "I61.9"),
                  _condition("BADV", "Z0389")]
    for name, items in (("Patient", patients), ("Condition", conditions)):
        (ehr / f"{name}.ndjson").write_text("".join(json.dumps(i) + "\n" for i in items))
    notes = raw / "notes"
    notes.mkdir()
    (notes / "MRP1.txt").write_text("Odile Quill, fever and headache for 5 days; Quill denies trauma.\n")
    (notes / "BADV.txt").write_text("Florian Ashgrove reports dizziness after standing, resolved.\n")
    params = params_from_dict({"ingest": {"allow_ephemeral_key_for_synthetic": False, "num_workers": 1}})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDDIFF_DEID_KEY", KEY)
        run_ingest(params, raw, root / "interim", root / "quarantine", root / "report")
    quarantine = [json.loads(line) for line in (root / "quarantine" / "quarantine.jsonl").read_text().splitlines()]
    return Run(raw, root / "interim", pd.read_parquet(root / "interim" / "manifest.parquet"), quarantine,
               json.loads((root / "report" / "validation.json").read_text()), Pseudonymizer(KEY.encode()),
               mr_files, ct_files)


def test_mr_series_is_accepted_with_its_values(run: Run) -> None:
    row = run.row("MRP1")
    assert row.has_image and row.image_modality == "MR" and row.label == "brain_abscess"
    np.testing.assert_array_equal(np.asarray(nib.load(run.interim / row.image_path).dataobj),
                                  reference_hu(run.mr_files))
    assert row.age == 66.0  # birthDate 1957-07 at 2024-06-30, dated to mid-month


def test_patient_without_site_is_accepted_with_an_unknown_site(run: Run) -> None:
    assert run.row("MRP1").site == "unknown" and run.row("CTP1").site == "unknown"
    assert run.row("BOTH").site == "site_a"
    ct = run.row("CTP1")
    assert ct.image_modality == "CT" and ct.label == "ischemic_stroke" and ct.age == 66.0  # 1957: 1 July
    np.testing.assert_array_equal(np.asarray(nib.load(run.interim / ct.image_path).dataobj),
                                  reference_hu(run.ct_files))


def test_ct_wins_over_mr_and_bad_values_or_dicomdir_stop_nothing(run: Run) -> None:
    assert run.row("BOTH").image_modality == "CT"
    assert run.reasons("imaging/BOTH/mr") == {"multiple_series"}
    assert run.reasons("imaging/CTP1/DICOMDIR") == {"media_directory"}
    bad = [q for q in run.quarantine if q["source"].startswith("imaging/BADV")]
    assert {q["reason"] for q in bad} == {"invalid_header_value"} and all("n/a" in q["message"] for q in bad)
    badv = run.row("BADV")  # its note still admits the patient, without an image
    assert not badv.has_image and badv.has_note and "[NAME]" in badv.note
    assert run.report["records_in"] == run.report["accepted"] + run.report["quarantined"]


def test_no_name_or_raw_id_reaches_interim(run: Run) -> None:
    assert "[NAME]" in run.row("MRP1").note and "Quill" not in run.row("MRP1").note
    secrets = ["Quill", "Odile", "Brann", "Varn", "Ysol", "Ashgrove", "Florian", "MRP1", "CTP1", "BADV"]
    for path in sorted(p for p in run.interim.rglob("*") if p.is_file()):
        if path.suffix == ".parquet":
            text = pd.read_parquet(path).to_csv()
        elif path.name.endswith(".nii.gz"):
            text = path.name
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
        assert not [s for s in secrets if s in text], path.name


def test_mr_intensities_are_scaled_per_scan_within_the_body() -> None:
    """Background 0, body 100..300: the body's 0.5/99.5 percentiles map to 0 and 1, background to 0."""
    image = np.zeros((1, 10, 10, 10), np.float32)
    image[0, 2:8, 2:8, 2:8] = np.linspace(100.0, 300.0, 216).reshape(6, 6, 6)
    out = MRPercentileScaled("image")({"image": image})["image"]
    body = image[image > image.mean()]
    low, high = np.percentile(body, [MR_LOWER_PERCENTILE, MR_UPPER_PERCENTILE])
    np.testing.assert_allclose(out, np.clip((image - low) / (high - low), 0, 1), rtol=1e-6)
    assert out[0, 0, 0, 0] == 0.0 and out.max() == 1.0
    brighter = MRPercentileScaled("image")({"image": image * 3.0 + 0.0})["image"]
    np.testing.assert_allclose(brighter, out, atol=1e-6)  # per-scan: a global gain changes nothing
