"""Ingest: every injected fault is quarantined with its reason, counts add up, GX finds bad rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pytest

from meddiff.config import DatasetConfig
from meddiff.data.fhir import harmonise, icd10_class, observation_row
from meddiff.data.validation import RECORD_ID, TableValidator, observation_rules, series_rules

if TYPE_CHECKING:
    from tests.data.conftest import Pipeline


def _quarantine(pipeline: Pipeline) -> list[dict]:
    path = pipeline.quarantine / "quarantine.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_counts_add_up(pipeline: Pipeline) -> None:
    report = json.loads((pipeline.ingest_report / "validation.json").read_text())
    assert report["records_in"] == report["accepted"] + report["quarantined"]
    assert report["quarantined"] == sum(report["quarantined_by_reason"].values()) == len(_quarantine(pipeline))
    assert report["records_in"] == sum(k["records_in"] for k in report["by_kind"].values())
    assert set(report["by_kind"]) >= {"patient", "observation", "condition", "note", "image_series", "lesion_mask"}
    assert (pipeline.ingest_report / "validation.html").is_file()
    for table in ("patient", "observation", "condition", "note", "image_series"):
        gx_result = json.loads((pipeline.ingest_report / "gx" / f"{table}.json").read_text())
        assert "results" in gx_result


def test_every_injected_fault_is_quarantined_with_its_reason(pipeline: Pipeline) -> None:
    ledger = json.loads((pipeline.raw / "cohort.json").read_text())
    quarantined = _quarantine(pipeline)
    for fault in ledger["faults"]:
        pid = fault["patient_id"]
        matches = [q for q in quarantined
                   if q["kind"] == fault["record_kind"] and q["reason"] == fault["expected_reason"]
                   and (q["patient_id"] == pid or f"/{pid}/" in q["source"])]
        assert matches, f"{fault} not found in quarantine"
        for match in matches:
            assert match["message"]
            for copy in match["copies"]:
                assert (pipeline.quarantine / copy).is_file()


def test_a_quarantined_patient_orphans_its_records(pipeline: Pipeline, pseudonym_of: dict[str, str]) -> None:
    ledger = json.loads((pipeline.raw / "cohort.json").read_text())
    pid = next(f["patient_id"] for f in ledger["faults"] if f["fault"] == "implausible_birth_date")
    records = [q for q in _quarantine(pipeline) if q["patient_id"] == pid]
    kinds = {q["kind"]: q["reason"] for q in records}
    assert kinds["patient"] == "out_of_range"
    assert kinds["condition"] == "orphan_record"
    manifest = pd.read_parquet(pipeline.interim / "manifest.parquet")
    assert pseudonym_of[pid] not in set(manifest.patient_id)


def test_manifest_keeps_the_accepted_modalities(pipeline: Pipeline, pseudonym_of: dict[str, str]) -> None:
    manifest = pd.read_parquet(pipeline.interim / "manifest.parquet")
    labs = pipeline.params.dataset.feature_names
    assert list(manifest.columns) == ["patient_id", "site", "label", "age", "sex", *labs, "note", "image_path",
                                      "series_instance_uid", "has_image", "has_note", "has_labs", "mask_path",
                                      "image_modality", "lesion_contrast_hu"]
    assert manifest.patient_id.is_unique
    assert set(manifest.label) <= set(pipeline.params.dataset.class_names)
    ledger = json.loads((pipeline.raw / "cohort.json").read_text())
    faults = {f["fault"]: pseudonym_of[f["patient_id"]] for f in ledger["faults"]}
    row = manifest.set_index("patient_id").loc[faults["truncated_dicom"]]
    assert not row.has_image and pd.isna(row.image_path) and pd.isna(row.mask_path)
    assert not manifest.set_index("patient_id").loc[faults["non_utf8_note"]].has_note
    assert np.isnan(manifest.set_index("patient_id").loc[faults["out_of_range_lab"], "wbc"])
    for _, item in manifest[manifest.has_image].iterrows():
        assert (pipeline.interim / item.image_path).is_file()
    assert (manifest.has_image | manifest.has_note | manifest.has_labs).all()
    assert set(manifest.image_modality.dropna()) == {"CT"}
    assert manifest.image_modality.isna().eq(~manifest.has_image).all()
    assert manifest.temperature.dropna().between(34, 42).all(), "°F values were converted to Cel"
    assert manifest.glucose.dropna().between(1, 20).all(), "mg/dL values were converted to mmol/L"


def test_gx_catches_a_planted_out_of_range_value() -> None:
    config = DatasetConfig()
    rows = []
    for i, value in enumerate([7.0, 950.0, 8.1]):
        rows.append({RECORD_ID: f"obs-{i}", "observation_id": f"o{i}", "patient_id": "P1", "lab": "wbc",
                     "raw_value": value, "unit": "10*3/uL", "value": value})
    rows.append({RECORD_ID: "obs-3", "observation_id": "o3", "patient_id": "P1", "lab": "temperature",
                 "raw_value": 99.0, "unit": "kg", "value": None})
    frame = pd.DataFrame(rows)
    for lab in config.feature_units:
        frame[lab] = frame["value"].where(frame["lab"] == lab).astype(float)
    rules = observation_rules(config.feature_ranges, config.feature_units)
    outcome = TableValidator().validate("observation", frame, rules)
    assert not outcome.success
    assert outcome.failures.keys() == {"obs-1", "obs-3"}
    assert outcome.failures["obs-1"][0] == "out_of_range" and "950" in outcome.failures["obs-1"][1]
    assert outcome.failures["obs-3"][0] == "unknown_unit"


def test_unit_harmonisation_and_code_mapping() -> None:
    assert harmonise("glucose", 180.16, "mg/dL", "mmol/L") == pytest.approx(10.0)
    assert harmonise("temperature", 98.6, "[degF]", "Cel") == pytest.approx(37.0)
    assert harmonise("crp", 5.0, "mg/dL", "mmol/L") is None  # molar mass conversion is glucose-only
    assert harmonise("glucose", 5.0, "mg%", "mmol/L") is None
    assert icd10_class("I63.4", {"I63": "ischemic_stroke", "I6": "other"}) == "ischemic_stroke"
    assert icd10_class("Q99", {"I63": "ischemic_stroke"}) is None
    resource = {"resourceType": "Observation", "id": "o", "code": {"coding": [{"system": "http://loinc.org",
                "code": "2345-7"}]}, "subject": {"reference": "Patient/P9"},
                "valueQuantity": {"value": 90.08, "code": "mg/dL"}}
    row = observation_row(resource, {"2345-7": "glucose"}, {"glucose": "mmol/L"})
    assert row["patient_id"] == "P9" and row["value"] == pytest.approx(5.0)


def test_one_bad_record_never_stops_the_stage(pipeline: Pipeline, tmp_path: Path) -> None:
    """A malformed line, a stray file and an unknown ICD-10 code are quarantined; the stage finishes."""
    import shutil

    from meddiff.data.ingest import run_ingest

    raw = tmp_path / "raw"
    shutil.copytree(pipeline.raw, raw)
    with open(raw / "ehr" / "Condition.ndjson", "a") as handle:
        handle.write("{not json\n")
        unknown_code = {"resourceType": "Condition", "id": "cx", "subject": {"reference": "Patient/P00001"},
                        "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": "Q99"}]}}
        handle.write(json.dumps(unknown_code) + "\n")
    (raw / "stray.csv").write_text("a,b\n")
    result = run_ingest(pipeline.params, raw, tmp_path / "interim", tmp_path / "q", tmp_path / "report")
    reasons = {(q["kind"], q["reason"]) for q in
               map(json.loads, (tmp_path / "q" / "quarantine.jsonl").read_text().splitlines())}
    assert {("condition", "invalid_json"), ("condition", "unknown_code"), ("file", "unexpected_file")} <= reasons
    assert result.records_in == result.accepted + result.quarantined


def test_gx_rejects_every_series_of_a_patient_with_two() -> None:
    frame = pd.DataFrame({RECORD_ID: ["s1", "s2", "s3"], "patient_id": ["P1", "P1", "P2"],
                          "series_uid": ["1", "2", "3"],
                          "n_slices": [24, 24, 24], "hu_min": [-1000.0, -1000.0, -1000.0],
                          "hu_max": [1000.0, 1000.0, 9000.0]})
    outcome = TableValidator().validate("image_series", frame, series_rules())
    assert outcome.failures["s1"][0] == outcome.failures["s2"][0] == "multiple_series"
    assert outcome.failures["s3"][0] == "implausible_hu"


def test_ledger_finds_records_by_kind_and_id() -> None:
    from meddiff.data.quarantine import Ledger, Record

    ledger = Ledger()
    patient = ledger.add(Record("patient", "P1", "ehr/Patient.ndjson:1"))
    note = ledger.add(Record("note", "P1", "notes/P1.txt"))  # same id, other kind: a different record
    assert ledger.get("patient", "P1") is patient and ledger.get("note", "P1") is note
    with pytest.raises(KeyError, match="no condition record 'P1'"):
        ledger.get("condition", "P1")
    with pytest.raises(ValueError, match="added twice"):
        ledger.add(Record("note", "P1", "elsewhere"))
    ledger.quarantine(note, "not_utf8", "bad bytes")
    ledger.quarantine(note, "note_too_short", "second reason is ignored")
    summary = ledger.summary()
    assert (summary["records_in"], summary["accepted"], summary["quarantined"]) == (2, 1, 1)
    assert summary["quarantined_by_reason"] == {"not_utf8": 1}


def test_inventory_sorts_files_by_reader(tmp_path: Path) -> None:
    from meddiff.data.ingest.inventory import Inventory

    found = Inventory()
    raw = tmp_path / "raw"
    taken = {
        relative: found.take(raw / relative, Path(relative))
        for relative in ("imaging/P1/s1/1.dcm", "imaging/B1/B1_t1.nii.gz", "masks/P1.nii.gz", "ehr/Patient.ndjson",
                         "ehr/bundle.json", "ehr/labevents.csv", "notes/P1.txt", "ehr/Encounter.ndjson",
                         "masks/deep/P1.nii.gz", "notes/P1.pdf")
    }
    assert [r for r, ok in taken.items() if not ok] == ["ehr/Encounter.ndjson", "masks/deep/P1.nii.gz", "notes/P1.pdf"]
    assert found.dicom == [str(raw / "imaging/P1/s1/1.dcm")]
    assert found.nifti_cases == {"B1": [raw / "imaging/B1/B1_t1.nii.gz"]}
    assert (found.masks, found.ndjson, found.bundles) == ([raw / "masks/P1.nii.gz"], [raw / "ehr/Patient.ndjson"],
                                                          [raw / "ehr/bundle.json"])
    assert (found.csv, found.notes) == ([raw / "ehr/labevents.csv"], [raw / "notes/P1.txt"])


def test_conflicting_conditions_give_no_label() -> None:
    from meddiff.data.ingest.manifest import decide_labels
    from meddiff.data.quarantine import Ledger, Record

    ledger = Ledger()
    for record_id in ("c1", "c2", "c3", "c4"):
        ledger.add(Record("condition", record_id, "ehr/Condition.ndjson"))
    conditions = pd.DataFrame({RECORD_ID: ["c1", "c2", "c3", "c4"], "patient_id": ["P1", "P1", "P2", "P2"],
                               "label": ["ischemic_stroke", "ischemic_stroke", "ischemic_stroke", "hemorrhage"]})
    assert decide_labels(conditions, ledger) == {"P1": "ischemic_stroke"}
    assert [r.reason for r in ledger.records] == [None, None, "conflicting_labels", "conflicting_labels"]
    assert "['hemorrhage', 'ischemic_stroke']" in (ledger.get("condition", "c3").message or "")


def test_a_mask_must_match_its_image_grid_and_be_binary() -> None:
    from meddiff.data.ingest.manifest import _mask_problem

    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    mask = np.zeros((4, 4, 3), dtype=np.uint8)
    mask[1, 1, 1] = 1
    assert _mask_problem(mask, affine, (4, 4, 3), affine) is None
    assert _mask_problem(mask, affine, (4, 4, 4), affine)[0] == "geometry_mismatch"
    shifted = affine.copy()
    shifted[0, 3] = 0.5
    assert _mask_problem(mask, shifted, (4, 4, 3), affine)[0] == "geometry_mismatch"
    mask[2, 2, 2] = 4
    assert _mask_problem(mask, affine, (4, 4, 3), affine) == ("invalid_mask", "mask values [0 1 4] are not binary")


def test_the_table_loop_quarantines_the_failing_rows_of_each_kind() -> None:
    from meddiff.data.ingest.tables import TableSpec, validate_tables
    from meddiff.data.quarantine import Ledger, Record

    ledger = Ledger()
    for kind in ("observation", "image_series"):  # same record ids in two kinds: each table hits its own
        for record_id in ("r1", "r2"):
            ledger.add(Record(kind, record_id, "raw"))
    config = DatasetConfig()
    observations = pd.DataFrame({RECORD_ID: ["r1", "r2"], "observation_id": ["o1", "o2"], "patient_id": ["P1", "P2"],
                                 "lab": ["wbc", "wbc"], "raw_value": [7.0, 950.0], "unit": ["10*3/uL"] * 2,
                                 "value": [7.0, 950.0]})
    for lab in config.feature_units:
        observations[lab] = observations["value"].where(observations["lab"] == lab).astype(float)
    series = pd.DataFrame({RECORD_ID: ["r1", "r2"], "patient_id": ["P1", "P2"], "series_uid": ["1", "2"],
                           "n_slices": [24, 24], "hu_min": [-1000.0, -1000.0], "hu_max": [9000.0, 1000.0]})
    validations = validate_tables((
        TableSpec("observation", observations, observation_rules(config.feature_ranges, config.feature_units)),
        TableSpec("image_series", series, series_rules()),
    ), ledger)
    assert list(validations) == ["observation", "image_series"]
    reasons = {(r.kind, r.record_id): r.reason for r in ledger.records}
    assert reasons == {("observation", "r1"): None, ("observation", "r2"): "out_of_range",
                       ("image_series", "r1"): "implausible_hu", ("image_series", "r2"): None}


def test_path_order_sorts_path_strings_as_paths_sort() -> None:
    from meddiff.data.ingest.imaging import path_order

    names = ["/r/a-b/x.dcm", "/r/a/x.dcm", "/r/a/z.dcm", "/r/a/b/1.dcm", "/r/a.b/2.dcm", "/r/A/1.dcm", "/r/a0/x"]
    assert sorted(names, key=path_order) == [str(p) for p in sorted(Path(n) for n in names)]
    assert sorted(names) != [str(p) for p in sorted(Path(n) for n in names)]  # plain string order differs


def test_header_store_groups_sorts_and_gives_quarantined_series_their_files(tmp_path: Path) -> None:
    from meddiff.data.dicom import SliceHeader
    from meddiff.data.ingest.imaging import HeaderStore, PackedHeader
    from meddiff.data.quarantine import Ledger, Record

    def header(path: str, series: str, frame: int | None = None) -> PackedHeader:
        return PackedHeader.of(SliceHeader(tmp_path / path, "P1", "st", series, f"sop-{path}-{frame}", "CT", None,
                                           None, None, None, None, None, frame=frame))

    with HeaderStore() as store:
        store.add([header("b/2.dcm", "s1"), header("a/9.dcm", "s2", 1), header("b/1.dcm", "s1"),
                   header("a/9.dcm", "s2", 0)])
        store.add([header("a/1.dcm", "s1")])
        assert store.series_uids() == ["s1", "s2"]
        assert [h.path.relative_to(tmp_path).as_posix() for h in store.members("s1")] == ["a/1.dcm", "b/1.dcm",
                                                                                         "b/2.dcm"]
        assert [h.frame for h in store.members("s2")] == [0, 1]
        assert store.files("s2") == (tmp_path / "a/9.dcm",)  # a multi-frame file once
        ledger = Ledger()
        kept, rejected = (ledger.add(Record("image_series", f"series/{uid}", "imaging")) for uid in ("s1", "s2"))
        ledger.quarantine(rejected, "geometry", "gap")
        store.attach_files(ledger)
        assert (kept.files, rejected.files) == ((), (tmp_path / "a/9.dcm",))
        folder = store._folder.name
    assert not Path(folder).exists()


def test_ehr_rows_read_as_they_come_equal_the_tables_of_the_same_items() -> None:
    import datetime

    from meddiff.config import IngestConfig
    from meddiff.data.ingest.ehr import CSV, FHIR
    from meddiff.data.ingest.tables import (
        EhrRows,
        condition_table,
        observation_table,
        patient_identifiers,
        patient_table,
        with_lab_columns,
    )
    from meddiff.data.quarantine import Ledger, Record

    dataset, config, day = DatasetConfig(), IngestConfig(), datetime.date(2024, 6, 30)
    items = {
        "patient": [({"resourceType": "Patient", "id": "P1", "gender": "female", "birthDate": "1950-02-03",
                      "name": [{"family": "Doe", "given": ["Jane"]}]}, FHIR),
                    ({"resourceType": "Patient", "id": "P2", "birthDate": 17}, FHIR),
                    ({"subject_id": "7", "gender": "M", "anchor_age": "61", "anchor_year": "2020"}, CSV)],
        "observation": [({"resourceType": "Observation", "id": "o1", "subject": {"reference": "Patient/P1"},
                          "code": {"coding": [{"system": "http://loinc.org", "code": "6690-2"}]},
                          "valueQuantity": {"value": 7.5, "unit": "10*3/uL"}}, FHIR),
                        ({"resourceType": "Observation", "id": "o2", "subject": "Patient/P1"}, FHIR)],
        "condition": [({"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/P1"},
                        "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "I63.9"}]}},
                       FHIR)],
    }

    def records(ledger: Ledger) -> dict[str, list[tuple[Record, dict, str]]]:
        return {kind: [(ledger.add(Record(kind, f"{kind}{i}", "ehr")), resource, fmt)
                       for i, (resource, fmt) in enumerate(listed)] for kind, listed in items.items()}

    old_ledger, new_ledger = Ledger(), Ledger()
    old_items, new_items = records(old_ledger), records(new_ledger)
    old = {"patient": patient_table(old_items["patient"], config, day, old_ledger),
           "observation": observation_table(old_items["observation"], dataset, old_ledger),
           "condition": condition_table(old_items["condition"], dataset, old_ledger)}
    rows = EhrRows.for_ingest(new_ledger, config, dataset, day)
    for listed in new_items.values():
        for item in listed:
            rows.keep(*item)
    new = {kind: rows.table(kind) for kind in ("patient", "observation", "condition")}
    new["observation"] = with_lab_columns(new["observation"], dataset)
    for kind in old:
        pd.testing.assert_frame_equal(new[kind], old[kind])
    assert len(new["patient"]) == 3 and new["observation"]["value"].tolist()[0] == 7.5
    assert [(r.reason, r.patient_id) for r in new_ledger.records] == [(r.reason, r.patient_id)
                                                                      for r in old_ledger.records]
    assert rows.identifiers == patient_identifiers(old_items["patient"])
    assert "Doe" in " ".join(rows.identifiers["patient0"].names)
    broken = EhrRows(new_ledger, {"condition": (["record_id", "patient_id"], lambda r: {"patient_id": r["subject"]},
                                                lambda r: {})})
    unreadable = new_ledger.add(Record("condition", "c-unreadable", "ehr"))
    broken.keep(unreadable, {"id": "c9"}, FHIR)
    assert (unreadable.reason, broken.table("condition").empty) == ("invalid_resource", True)
    assert "KeyError" in (unreadable.message or "")


def test_raw_texts_reach_only_the_quarantined_records() -> None:
    from meddiff.data.ingest.ehr import RawTexts
    from meddiff.data.quarantine import Ledger, Record

    ledger = Ledger()
    kept, rejected, odd = (ledger.add(Record("observation", record_id, "ehr")) for record_id in ("o1", "o2", "o\ud800"))
    with RawTexts() as raw_texts:
        for record in (kept, rejected, odd):
            raw_texts.add(record, f'{{"id": "{record.record_id}"}}')
        ledger.add(Record("observation", "o4", "ehr", raw_text="on the record"))
        ledger.quarantine(rejected, "out_of_range", "high")
        ledger.quarantine(odd, "invalid_json", "bad")
        ledger.quarantine(ledger.get("observation", "o4"), "invalid_json", "bad")
        raw_texts.attach(ledger)
    assert [r.raw_text for r in ledger.records] == [None, '{"id": "o2"}', '{"id": "o\ud800"}', "on the record"]
