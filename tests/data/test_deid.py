"""De-identification: the key, the DICOM Basic Profile, note scrubbing, and a scan of every output file."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file

from meddiff.data.deid import (
    DeidKeyError,
    PatientIdentifiers,
    Pseudonymizer,
    deidentify_dataset,
    deidentify_text,
    resolve_key,
)
from meddiff.data.phi_scan import find_identifiers, raw_identifiers

if TYPE_CHECKING:
    from tests.data.conftest import Pipeline

ENV = "MEDDIFF_DEID_KEY"


def test_key_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(DeidKeyError, match=f"set the environment variable {ENV}"):
        resolve_key(ENV, False, tmp_path)
    with pytest.raises(DeidKeyError, match="not a `meddiff cohort` provenance"):
        resolve_key(ENV, True, tmp_path)  # no cohort.json: real data never gets an ephemeral key
    (tmp_path / "cohort.json").write_text(json.dumps({"generator": "somebody else"}))
    with pytest.raises(DeidKeyError):
        resolve_key(ENV, True, tmp_path)
    (tmp_path / "cohort.json").write_text(json.dumps({"generator": "meddiff.data.cohort", "seed": 1}))
    key, source = resolve_key(ENV, True, tmp_path)
    assert len(key) == 32 and "synthetic" in source
    monkeypatch.setenv(ENV, "short")
    with pytest.raises(DeidKeyError, match="shorter than"):
        resolve_key(ENV, True, tmp_path)
    monkeypatch.setenv(ENV, "a-long-enough-secret-for-tests")
    key, source = resolve_key(ENV, True, tmp_path)
    assert key == b"a-long-enough-secret-for-tests" and source == f"environment variable {ENV}"


def test_ingest_stops_without_a_key(pipeline: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from meddiff.data.ingest import run_ingest

    monkeypatch.delenv(ENV, raising=False)
    strict = pipeline.params.model_copy(update={
        "ingest": pipeline.params.ingest.model_copy(update={"allow_ephemeral_key_for_synthetic": False})})
    with pytest.raises(DeidKeyError, match=ENV):
        run_ingest(strict, pipeline.raw, tmp_path / "i", tmp_path / "q", tmp_path / "r")
    assert not (tmp_path / "i").exists(), "nothing is written before the key is known"


def test_pseudonyms_are_keyed_and_consistent() -> None:
    a, b = Pseudonymizer(b"k" * 32), Pseudonymizer(b"j" * 32)
    assert a.pseudonym("P00001") == a.pseudonym("P00001") != b.pseudonym("P00001")
    assert a.pseudonym("P00001") != a.pseudonym("P00002")
    uid = a.uid("1.2.3.4")
    assert uid == a.uid("1.2.3.4") and uid.startswith("2.25.") and len(uid) <= 64
    assert pydicom.uid.UID(uid).is_valid
    assert 1 <= a.date_shift_days("P00001") <= 365


def test_dicom_basic_profile_on_a_real_file() -> None:
    original = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    original.InstitutionName = "General Hospital"
    original.ReferringPhysicianName = "Welby^Marcus"
    original.AccessionNumber = "A123456"
    original.add_new(0x00091001, "LO", "private vendor data")
    pseudo = Pseudonymizer(b"secret-key-for-the-test-000000")
    ds = deidentify_dataset(copy.deepcopy(original), pseudo, str(original.PatientID))
    assert ds.PatientID == pseudo.pseudonym(str(original.PatientID)) == str(ds.PatientName)
    assert ds.PatientBirthDate == "" and ds.AccessionNumber == "" and ds.ReferringPhysicianName == ""
    assert "InstitutionName" not in ds and "PatientAge" not in ds
    assert not any(element.tag.is_private for element in ds)
    assert ds.PatientIdentityRemoved == "YES" and "Annex E" in str(ds.DeidentificationMethod)
    assert {c.CodeValue for c in ds.DeidentificationMethodCodeSequence} == {"113100", "113107"}
    assert ds.SOPClassUID == original.SOPClassUID  # a registered UID is not an identifier
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
        assert ds[keyword].value == pseudo.uid(str(original[keyword].value)) != original[keyword].value
    again = deidentify_dataset(copy.deepcopy(original), pseudo, str(original.PatientID))
    assert again.StudyInstanceUID == ds.StudyInstanceUID, "UIDs are replaced consistently across files"
    shift = pseudo.date_shift_days(str(original.PatientID))
    assert ds.StudyDate != original.StudyDate and ds.StudyTime == ""
    delta = np.datetime64(f"{original.StudyDate[:4]}-{original.StudyDate[4:6]}-{original.StudyDate[6:]}") - \
        np.datetime64(f"{ds.StudyDate[:4]}-{ds.StudyDate[4:6]}-{ds.StudyDate[6:]}")
    assert int(delta.astype(int)) == shift


def test_notes_are_scrubbed() -> None:
    who = PatientIdentifiers("P00042", names=("Eleanor", "Whitfield"), address=("12 Maple Street", "Millbrook",
                            "40213"), phones=("(555) 555-0199",), birth_date="1950-02-03")
    text = ("ED note 3/14/2024. Patient: Eleanor Whitfield, DOB 02/03/1950 (1950-02-03), MRN P00042. Lives at "
            "12 Maple Street, Millbrook 40213. Seen by Dr. Okafor on March 14, 2024; call (555) 555-0199 or "
            "e.whitfield@example.org. 93yo F with headache, no ICH.")
    scrubbed = deidentify_text(text, who)
    for secret in ("Eleanor", "Whitfield", "1950", "P00042", "Maple", "Millbrook", "40213", "555-0199", "Okafor",
                   "March 14", "3/14/2024", "example.org", "93yo"):
        assert secret not in scrubbed, (secret, scrubbed)
    assert "no ICH" in scrubbed and "headache" in scrubbed and "90+yo" in scrubbed
    assert deidentify_text("Pt 1yo, GCS 14, WBC 12.5, BP 150/90") == "Pt 1yo, GCS 14, WBC 12.5, BP 150/90"


def test_no_identifier_reaches_interim_or_processed(pipeline: Pipeline) -> None:
    secrets = raw_identifiers(pipeline.raw)
    assert len(secrets) > 100 and any("^" in s for s in secrets)
    raw_note = next(p for p in sorted((pipeline.raw / "notes").glob("*.txt")) if p.stat().st_size > 100)
    assert any(s.lower() in raw_note.read_text(errors="replace").lower() for s in secrets), "the scan can find PHI"
    files = [p for root in (pipeline.interim, pipeline.processed) for p in sorted(root.rglob("*")) if p.is_file()]
    assert any(p.suffix == ".json" and p.parent.name == "headers" for p in files)
    leaks = find_identifiers([pipeline.interim, pipeline.processed], [*secrets, "P000"])  # "P000": raw id prefix
    assert not leaks, [f"{leak.path.relative_to(leak.path.parents[1])}: {leak.identifiers[:5]}" for leak in leaks]


def test_deidentified_headers_keep_what_the_profile_requires(pipeline: Pipeline) -> None:
    manifest = pd.read_parquet(pipeline.interim / "manifest.parquet")
    row = manifest[manifest.has_image].iloc[0]
    path = pipeline.interim / "headers" / f"{row.patient_id}.json"
    header = pydicom.Dataset.from_json(json.loads(path.read_text()))
    assert header.PatientID == row.patient_id and header.PatientIdentityRemoved == "YES"
    assert header.SeriesInstanceUID == row.series_instance_uid
    assert header.Modality == "CT" and header.PatientBirthDate == "" and "InstitutionName" not in header
    assert manifest.age.max() <= pipeline.params.ingest.deid_max_age
