"""``meddiff ingest``: raw imaging / EHR / notes -> validated, de-identified interim data + quarantine.

Inputs (all optional, mixed freely in one drop; see ``docs/data.md``):

* imaging: DICOM series (single- or multi-frame, native or compressed transfer syntaxes) or NIfTI cases
  in the BraTS layout ``imaging/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz``; ``masks/<patient>.nii.gz``;
* EHR: FHIR R4 NDJSON (``ehr/<Resource>.ndjson``), FHIR Bundles (``ehr/*.json``), MIMIC-IV style CSV
  (``ehr/patients.csv``, ``labevents.csv``, ``diagnoses_icd.csv``);
* notes: ``notes/<patient>.txt`` and FHIR DocumentReference (inline text/plain attachment).

Every input item becomes one record (:mod:`meddiff.data.quarantine`) of a kind: ``image_series``,
``lesion_mask``, ``patient``, ``observation``, ``condition``, ``note`` and stray ``file``. Records are
checked in two layers: structural checks while reading (paths, DICOM geometry, JSON, UTF-8) and
great-expectations suites per table (:mod:`meddiff.data.validation`), which name exactly the failing
rows. A patient enters ``interim_dir/manifest.parquet`` when its Patient record is accepted, it has a
diagnosis label and at least one accepted modality; records of rejected patients are quarantined as
``orphan_record``. One bad record never stops the stage.

Nothing identifying reaches ``interim_dir`` (:mod:`meddiff.data.deid`): patient ids become keyed
pseudonyms (also in file names), UIDs are replaced, DICOM headers kept in ``interim/headers/`` are
de-identified with the PS3.15 Annex E Basic Profile, notes are scrubbed, and only age (capped), sex,
site, labs and the diagnosis are taken from the EHR. Symlinks and unsafe names in the raw tree are
quarantined and never followed.
"""

from __future__ import annotations

import datetime
import hashlib
import html
import json
import logging
import multiprocessing
import os
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from meddiff.config import Params
from meddiff.data import ehr_csv
from meddiff.data.deid import (
    DEID_METHOD,
    PatientIdentifiers,
    Pseudonymizer,
    cap_age,
    deidentify_dataset,
    deidentify_text,
    identifiers_from_patient,
    resolve_key,
)
from meddiff.data.dicom import FileProblem, SeriesError, SliceHeader, load_series, read_headers
from meddiff.data.fhir import (
    condition_row,
    document_note,
    observation_row,
    patient_row,
    read_bundle,
    read_ndjson,
)
from meddiff.data.nifti import CaseError, is_nifti, load_brats_case
from meddiff.data.notes import decode_note, normalise_note
from meddiff.data.quarantine import Ledger, Record
from meddiff.data.validation import (
    RECORD_ID,
    TableValidation,
    TableValidator,
    condition_rules,
    note_rules,
    observation_rules,
    patient_rules,
    series_rules,
)
from meddiff.io import atomic_dir, write_json

LOG = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.parquet"
HEADERS_DIR = "headers"
#: files at the top of raw_dir that describe the drop rather than hold records
PROVENANCE_FILES = frozenset({"cohort.json", "README.md", "README.txt"})
#: FHIR resource type -> record kind
EHR_RESOURCES: dict[str, str] = {"Patient": "patient", "Observation": "observation", "Condition": "condition",
                                 "DocumentReference": "note"}
#: characters never accepted in a raw file or folder name (path tricks, control characters)
_UNSAFE_NAME = re.compile(r"\.\.|[\\\x00-\x1f\x7f]")
ACCEPTED_MODALITIES = ("CT",)


@dataclass
class IngestResult:
    """Summary of ``meddiff ingest``."""

    interim_dir: Path
    manifest: Path
    n_patients: int
    records_in: int
    accepted: int
    quarantined: int
    quarantined_by_reason: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------ inventory


@dataclass
class Inventory:
    """The raw tree sorted by what reads it (paths only: nothing is opened here)."""

    dicom: list[Path] = field(default_factory=list)
    nifti_cases: dict[str, list[Path]] = field(default_factory=dict)
    masks: list[Path] = field(default_factory=list)
    ndjson: list[Path] = field(default_factory=list)
    bundles: list[Path] = field(default_factory=list)
    csv: list[Path] = field(default_factory=list)
    notes: list[Path] = field(default_factory=list)


def _unsafe(ledger: Ledger, raw_dir: Path, path: Path, message: str) -> None:
    relative = str(path.relative_to(raw_dir))
    # files=(): nothing is copied (a copy would follow the link out of the tree)
    record = ledger.add(Record("file", f"file/{relative}", relative))
    ledger.quarantine(record, "unsafe_path", message)


def _inventory(raw_dir: Path, ledger: Ledger) -> Inventory:
    """Walk the raw tree without following symlinks; sort files by reader, quarantine the rest."""
    found = Inventory()
    root = os.path.realpath(raw_dir)
    for dirpath, dirnames, filenames in os.walk(raw_dir, followlinks=False):
        directory = Path(dirpath)
        for name in sorted(dirnames):
            path = directory / name
            if path.is_symlink() or _UNSAFE_NAME.search(name):
                target = os.path.realpath(path)
                where = "outside" if os.path.commonpath([root, target]) != root else "inside"
                _unsafe(ledger, raw_dir, path, f"{'symlinked' if path.is_symlink() else 'unsafe'} directory "
                        f"(resolves {where} the raw directory) is not followed")
                dirnames.remove(name)
        dirnames.sort()
        for name in sorted(filenames):
            path = directory / name
            relative = path.relative_to(raw_dir)
            if path.is_symlink():
                target = os.path.realpath(path)
                inside = os.path.commonpath([root, target]) == root
                what = "outside the raw directory" if inside is False else "inside the raw directory"
                if not os.path.exists(target):
                    what = "to nothing (dangling)"
                _unsafe(ledger, raw_dir, path, f"symlink pointing {what}; symlinks are never followed")
                continue
            if _UNSAFE_NAME.search(name):
                _unsafe(ledger, raw_dir, path, f"file name {name!r} contains '..' or control characters")
                continue
            if not path.is_file():
                _unsafe(ledger, raw_dir, path, "not a regular file (device, FIFO or socket)")
                continue
            top, depth = relative.parts[0], len(relative.parts)
            if depth == 1 and name in PROVENANCE_FILES:
                continue
            if top == "imaging" and is_nifti(path) and depth == 3:
                found.nifti_cases.setdefault(relative.parts[1], []).append(path)
            elif top == "imaging" and not is_nifti(path):
                found.dicom.append(path)
            elif top == "masks" and name.endswith(".nii.gz") and depth == 2:
                found.masks.append(path)
            elif top == "ehr" and depth == 2 and path.suffix == ".ndjson" and path.stem in EHR_RESOURCES:
                found.ndjson.append(path)
            elif top == "ehr" and depth == 2 and path.suffix == ".json":
                found.bundles.append(path)
            elif top == "ehr" and depth == 2 and name in ehr_csv.MIMIC_TABLES:
                found.csv.append(path)
            elif top == "notes" and path.suffix == ".txt" and depth == 2:
                found.notes.append(path)
            else:
                record = ledger.add(Record("file", f"file/{relative}", str(relative), files=(path,)))
                ledger.quarantine(record, "unexpected_file", f"{relative} is not part of the raw layout "
                                  "(imaging/, masks/, ehr/<Resource>.ndjson|*.json|<table>.csv, notes/<patient>.txt)")
    return found


# -------------------------------------------------------------------------------------------- imaging


def _save_nifti(data: np.ndarray, affine: np.ndarray, target: Path) -> None:
    """A fresh NIfTI-1 header (nothing copied from the source's descrip/aux_file/db_name)."""
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    nib.save(image, target)


def _assemble_series(task: tuple[str, list[SliceHeader], Path, bytes, int]) -> dict[str, Any]:
    """Worker: load one series, write it as NIfTI (RAS); de-identify its header; return a row or the error."""
    series_uid, headers, target, key, max_shift = task
    try:
        volume = load_series(headers)
    except SeriesError as error:
        return {"series_uid": series_uid, "error": (error.reason, error.message)}
    _save_nifti(volume.hu.astype(np.float32), volume.affine, target)
    header_json = None
    names: tuple[str, ...] = ()
    if volume.reference is not None:
        reference = volume.reference
        patient_name = str(reference.get("PatientName", "") or "")
        names = tuple(p for p in re.split(r"[\^=]", patient_name) if p.strip())
        deidentify_dataset(reference, Pseudonymizer(key, max_shift), str(reference.get("PatientID", "")))
        header_json = reference.to_json_dict(bulk_data_threshold=4096, bulk_data_element_handler=lambda _: "")
    return {
        "series_uid": series_uid, "error": None, "n_slices": int(volume.hu.shape[2]),
        "hu_min": float(volume.hu.min()), "hu_max": float(volume.hu.max()),
        "shape": list(volume.hu.shape), "affine": volume.affine.tolist(),
        "spacing_mm": [float(s) for s in volume.spacing_mm], "header": header_json, "names": names,
    }


def _pool(workers: int) -> Any:
    return multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None


def _chunks(items: list[Path], size: int) -> list[list[Path]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


SERIES_COLUMNS = [RECORD_ID, "patient_id", "series_uid", "n_slices", "hu_min", "hu_max", "shape", "affine",
                  "spacing_mm", "header", "names", "mask_file"]


def _ingest_dicom(
    raw_dir: Path, files: list[Path], images_dir: Path, ledger: Ledger, workers: int, pseudo: Pseudonymizer,
) -> tuple[list[dict[str, Any]], dict[str, Record]]:
    """DICOM files -> series records (+ NIfTI written for assembled ones)."""
    pool = _pool(workers)
    try:
        chunks = _chunks(sorted(files), 64)
        results = pool.imap(read_headers, chunks) if pool else map(read_headers, chunks)
        series: dict[str, list[SliceHeader]] = defaultdict(list)
        for batch in results:
            for item in batch:
                if isinstance(item, FileProblem):
                    relative = item.path.relative_to(raw_dir)
                    record = ledger.add(Record("file", f"file/{relative}", str(relative), files=(item.path,)))
                    ledger.quarantine(record, item.reason, item.message)
                else:
                    series[item.series_instance_uid].append(item)
        records: dict[str, Record] = {}
        tasks = []
        for series_uid, members in sorted(series.items()):
            members.sort(key=lambda h: (str(h.path), h.frame or 0))
            patient_ids = sorted({h.patient_id for h in members})
            source = str(members[0].path.parent.relative_to(raw_dir))
            record = ledger.add(Record("image_series", f"series/{series_uid}", source,
                                       patient_id=patient_ids[0] or None,
                                       files=tuple(dict.fromkeys(h.path for h in members))))
            records[series_uid] = record
            modalities = sorted({h.modality for h in members})
            studies = sorted({h.study_instance_uid for h in members})
            if len(patient_ids) > 1:
                ledger.quarantine(record, "inconsistent_patient", f"series mixes {len(patient_ids)} PatientIDs")
            elif len(studies) > 1:
                ledger.quarantine(record, "inconsistent_study", f"series spans {len(studies)} StudyInstanceUIDs")
            elif not set(modalities) <= set(ACCEPTED_MODALITIES):
                ledger.quarantine(record, "unsupported_modality",
                                  f"Modality {modalities}, expected {list(ACCEPTED_MODALITIES)}")
            else:
                target = images_dir / f"{pseudo.uid(series_uid)}.nii.gz"  # no raw UID in any interim name
                tasks.append((series_uid, members, target, pseudo.key, pseudo.max_date_shift_days))
        assembled = pool.imap(_assemble_series, tasks) if pool else map(_assemble_series, tasks)
        rows = []
        for outcome in assembled:
            record = records[outcome["series_uid"]]
            if outcome["error"] is not None:
                ledger.quarantine(record, *outcome["error"])
                continue
            rows.append({RECORD_ID: record.record_id, "patient_id": record.patient_id, "mask_file": None,
                         **{k: v for k, v in outcome.items() if k != "error"}})
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return rows, records


def _ingest_nifti(
    raw_dir: Path, cases: dict[str, list[Path]], images_dir: Path, ledger: Ledger, channel: str,
    pseudo: Pseudonymizer,
) -> tuple[list[dict[str, Any]], dict[str, Record]]:
    """BraTS cases -> image rows (the chosen channel) with their segmentation as the lesion mask."""
    rows, records = [], {}
    for case_id, files in sorted(cases.items()):
        source = str(files[0].parent.relative_to(raw_dir))
        record = ledger.add(Record("image_series", f"nifti/{case_id}", source, patient_id=case_id,
                                   files=tuple(sorted(files))))
        records[record.record_id] = record
        try:
            case = load_brats_case(case_id, files, channel)
        except CaseError as error:
            ledger.quarantine(record, error.reason, error.message)
            continue
        series_uid = f"nifti:{case_id}"
        target = images_dir / f"{pseudo.uid(series_uid)}.nii.gz"
        _save_nifti(case.image, case.affine, target)
        mask_target = images_dir / f"{pseudo.uid(series_uid)}.mask.nii.gz"
        _save_nifti(case.mask, case.affine, mask_target)
        rows.append({RECORD_ID: record.record_id, "patient_id": case_id, "series_uid": series_uid,
                     "n_slices": int(case.image.shape[2]), "hu_min": None, "hu_max": None,  # MR: not HU
                     "shape": list(case.image.shape), "affine": case.affine.tolist(),
                     "spacing_mm": [float(v) for v in nib.affines.voxel_sizes(case.affine)],
                     "header": None, "names": (), "mask_file": mask_target.name})
    return rows, records


# ------------------------------------------------------------------------------------------------ EHR


@dataclass
class EhrRecords:
    """Parsed EHR items per kind: ``(record, resource or row, source format)``."""

    items: dict[str, list[tuple[Record, dict[str, Any], str]]] = field(
        default_factory=lambda: {kind: [] for kind in ("patient", "observation", "condition", "note")})
    ignored_entries: Counter = field(default_factory=Counter)
    _seen: dict[tuple[str, bytes], str] = field(default_factory=dict)  # (kind, SHA-256 of canonical JSON)

    def add(self, ledger: Ledger, record: Record, resource: dict[str, Any], fmt: str) -> None:
        """Add a parsed item; an exact copy of an earlier one (same kind) is a ``duplicate_record``."""
        canonical = json.dumps(resource, sort_keys=True, separators=(",", ":"))
        key = (record.kind, hashlib.sha256(canonical.encode()).digest())
        if key in self._seen:
            ledger.quarantine(record, "duplicate_record", f"exact copy of {self._seen[key]}")
            return
        self._seen[key] = record.source
        self.items[record.kind].append((record, resource, fmt))


def _fhir_record(ledger: Ledger, resource: dict[str, Any] | None, resource_type: str, record_id: str,
                 source: str, raw_text: str | None) -> Record:
    kind = EHR_RESOURCES[resource_type]
    subject = resource.get("id") if kind == "patient" and resource else None
    return ledger.add(Record(kind, record_id, source, patient_id=subject if isinstance(subject, str) else None,
                             raw_text=raw_text))


def _ingest_ndjson(path: Path, ledger: Ledger, raw_dir: Path, ehr: EhrRecords) -> None:
    resource_type = path.stem
    relative = str(path.relative_to(raw_dir))
    for line in read_ndjson(path):
        resource = line.resource or {}
        resource_id = resource.get("id") if isinstance(resource.get("id"), str) else None
        record = _fhir_record(ledger, resource, resource_type, f"{resource_type}/{resource_id or '?'}@"
                              f"{relative}:{line.line_number}", f"{relative}:{line.line_number}", line.text)
        if line.error is not None:
            ledger.quarantine(record, "invalid_json", line.error)
        elif resource.get("resourceType") != resource_type:
            ledger.quarantine(record, "wrong_resource_type",
                              f"resourceType {resource.get('resourceType')!r} in {path.name}, expected {resource_type}")
        else:
            ehr.add(ledger, record, resource, "fhir")


def _ingest_bundle(path: Path, ledger: Ledger, raw_dir: Path, ehr: EhrRecords) -> None:
    relative = str(path.relative_to(raw_dir))
    entries, error = read_bundle(path)
    if error is not None:
        record = ledger.add(Record("file", f"file/{relative}", relative, files=(path,)))
        ledger.quarantine(record, "wrong_resource_type" if "resourceType" in error else "invalid_json", error)
        return
    for index, resource, problem in entries:
        resource_type = str((resource or {}).get("resourceType"))
        if resource is not None and resource_type not in EHR_RESOURCES:
            ehr.ignored_entries[resource_type] += 1  # Encounter, Claim, ...: not read, counted in the report
            continue
        resource_id = (resource or {}).get("id")
        record = _fhir_record(ledger, resource, resource_type if resource else "Patient",
                              f"{resource_type}/{resource_id or '?'}@{relative}#{index}", f"{relative}#entry{index}",
                              json.dumps(resource) if resource is not None else None)
        if problem is not None:
            ledger.quarantine(record, "invalid_json", problem)
        else:
            ehr.add(ledger, record, resource, "fhir")


def _ingest_csv(path: Path, ledger: Ledger, raw_dir: Path, ehr: EhrRecords) -> None:
    relative = str(path.relative_to(raw_dir))
    kind = ehr_csv.MIMIC_TABLES[path.name]
    rows, error = ehr_csv.read_csv_rows(path, ehr_csv.REQUIRED_COLUMNS[path.name])
    if error is not None:
        record = ledger.add(Record("file", f"file/{relative}", relative, files=(path,)))
        ledger.quarantine(record, "missing_field", error)
        return
    for row in rows:
        subject = (row.row or {}).get("subject_id")
        record = ledger.add(Record(kind, f"{path.stem}@{relative}:{row.line_number}", f"{relative}:{row.line_number}",
                                   patient_id=subject.strip() if kind == "patient" and subject else None,
                                   raw_text=row.text))
        if row.error is not None:
            ledger.quarantine(record, "invalid_json", row.error)
        else:
            ehr.add(ledger, record, row.row, "csv")  # type: ignore[arg-type]


def _apply(validation: TableValidation, by_id: dict[str, Record], ledger: Ledger) -> None:
    for record_id, (reason, message) in validation.failures.items():
        ledger.quarantine(by_id[record_id], reason, message)


# ------------------------------------------------------------------------------------------------ stage


def _html_summary(summary: dict[str, Any], tables: dict[str, TableValidation]) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(t)}</td><td>{html.escape(str(e['expectation']))}</td>"
        f"<td>{html.escape(str(e['column']))}</td><td>{'✔' if e['success'] else '✘'}</td>"
        f"<td>{e['unexpected_count']}</td><td>{html.escape(str(e['reason']))}</td></tr>"
        for t, v in tables.items() for e in v.expectations
    )
    reasons = "".join(f"<li>{html.escape(str(k))}: {v}</li>" for k, v in summary["quarantined_by_reason"].items())
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>meddiff ingest validation</title>"
        "<style>body{font-family:sans-serif}td,th{padding:2px 8px;border-bottom:1px solid #ddd}</style>"
        "</head><body><h1>Ingest validation</h1>"
        f"<p>records in: {summary['records_in']}, accepted: {summary['accepted']}, "
        f"quarantined: {summary['quarantined']}</p><h2>Quarantined by reason</h2><ul>{reasons}</ul>"
        "<h2>great-expectations suites</h2><table><tr><th>table</th><th>expectation</th><th>column</th>"
        f"<th>ok</th><th>unexpected</th><th>reason</th></tr>{rows}</table></body></html>\n"
    )


def _worker_count(configured: int) -> int:
    return configured if configured > 0 else max(1, min(os.cpu_count() or 1, 8))


def run_ingest(
    params: Params, raw_dir: Path, interim_dir: Path, quarantine_dir: Path, report_dir: Path
) -> IngestResult:
    """Read, validate, quarantine and de-identify the raw drop; write the interim manifest, images, masks."""
    started = time.perf_counter()
    from meddiff.data.s3 import stage_raw_dir  # s3://bucket/prefix: download to a local staging folder

    raw_dir = stage_raw_dir(raw_dir)
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"{raw_dir}: raw data directory not found; run `meddiff cohort` first")
    config = params.ingest
    class_names = list(params.cohort.classes)
    unknown_classes = sorted(set(config.icd10_to_class.values()) - set(class_names))
    if unknown_classes:
        raise ValueError(f"ingest.icd10_to_class maps to {unknown_classes}, not in cohort.classes {class_names}")
    key, key_source = resolve_key(config.deid_key_env, config.allow_ephemeral_key_for_synthetic, raw_dir)
    pseudo = Pseudonymizer(key, config.deid_max_date_shift_days)
    LOG.info("ingest: de-identification key %s", key_source)
    reference_date = datetime.date.fromisoformat(config.reference_date)
    workers = _worker_count(config.num_workers)
    ledger = Ledger()
    found = _inventory(raw_dir, ledger)

    with (
        atomic_dir(interim_dir) as interim,
        atomic_dir(quarantine_dir) as quarantine,
        atomic_dir(report_dir) as report,
    ):
        images_dir, masks_dir, headers_dir = interim / "images", interim / "masks", interim / HEADERS_DIR
        for directory in (images_dir, masks_dir, headers_dir):
            directory.mkdir()
        # imaging first: worker processes fork before great-expectations is imported
        series_rows, series_records = _ingest_dicom(raw_dir, found.dicom, images_dir, ledger, workers, pseudo)
        nifti_rows, nifti_records = _ingest_nifti(raw_dir, found.nifti_cases, images_dir, ledger,
                                                  config.brats_channel, pseudo)
        series_table = pd.DataFrame(series_rows + nifti_rows, columns=SERIES_COLUMNS)
        LOG.info("ingest: %d DICOM files -> %d series, %d NIfTI cases (%.1f s)", len(found.dicom),
                 len(series_records), len(nifti_records), time.perf_counter() - started)

        ehr = EhrRecords()
        for path in found.ndjson:
            _ingest_ndjson(path, ledger, raw_dir, ehr)
        for path in found.bundles:
            _ingest_bundle(path, ledger, raw_dir, ehr)
        for path in found.csv:
            _ingest_csv(path, ledger, raw_dir, ehr)

        validator = TableValidator()
        tables: dict[str, TableValidation] = {}
        by_id: dict[str, Record] = {}

        # Patient
        patient_rows, identifiers = [], {}
        for record, resource, fmt in ehr.items["patient"]:
            by_id[record.record_id] = record
            if fmt == "csv":
                row = ehr_csv.patient_row(resource, config.mimic_site)
            else:
                row = patient_row(resource, reference_date)
                identifiers[record.record_id] = identifiers_from_patient(resource)
            record.patient_id = row["patient_id"]
            patient_rows.append({RECORD_ID: record.record_id, **row})
        patients = pd.DataFrame(patient_rows, columns=[RECORD_ID, "patient_id", "sex", "birth_date", "age", "site"])
        tables["patient"] = validator.validate("patient", patients, patient_rules(config.age_range))
        _apply(tables["patient"], by_id, ledger)

        # Observation
        lab_by_loinc = {code: lab for lab, codes in config.lab_loinc.items() for code in codes}
        lab_by_itemid = {item: lab for lab, items in config.mimic_lab_itemids.items() for item in items}
        observation_rows = []
        for record, resource, fmt in ehr.items["observation"]:
            row = (ehr_csv.lab_row(resource, lab_by_itemid, config.lab_units) if fmt == "csv"
                   else observation_row(resource, lab_by_loinc, config.lab_units))
            record.patient_id = row["patient_id"]
            by_id[record.record_id] = record
            observation_rows.append({RECORD_ID: record.record_id, **row})
        observations = pd.DataFrame(observation_rows, columns=[
            RECORD_ID, "observation_id", "patient_id", "loinc", "lab", "raw_value", "unit", "value"])
        for lab in config.lab_units:  # one column per lab: GX range checks skip the NaN of other labs
            observations[lab] = observations["value"].where(observations["lab"] == lab).astype(float)
        tables["observation"] = validator.validate(
            "observation", observations, observation_rules(config.lab_ranges, config.lab_units)
        )
        _apply(tables["observation"], by_id, ledger)

        # Condition
        condition_rows = []
        for record, resource, fmt in ehr.items["condition"]:
            row = (ehr_csv.condition_row(resource, config.icd10_to_class) if fmt == "csv"
                   else condition_row(resource, config.icd10_to_class))
            record.patient_id = row["patient_id"]
            by_id[record.record_id] = record
            condition_rows.append({RECORD_ID: record.record_id, **row})
        conditions = pd.DataFrame(condition_rows, columns=[RECORD_ID, "condition_id", "patient_id", "icd10", "label"])
        tables["condition"] = validator.validate("condition", conditions, condition_rules(class_names))
        _apply(tables["condition"], by_id, ledger)

        # Notes: text files and DocumentReference attachments
        note_rows = []
        for path in found.notes:
            relative = str(path.relative_to(raw_dir))
            valid, text, _ = decode_note(path.read_bytes())
            record = ledger.add(Record("note", f"note/{path.stem}", relative, patient_id=path.stem, files=(path,)))
            by_id[record.record_id] = record
            note_rows.append({RECORD_ID: record.record_id, "patient_id": path.stem, "utf8_valid": valid, "text": text})
        for record, resource, _ in ehr.items["note"]:
            patient_id, data, problem = document_note(resource)
            record.patient_id = patient_id
            if problem is not None:
                reason, _, message = problem.partition(": ")
                ledger.quarantine(record, reason, message)
                continue
            by_id[record.record_id] = record
            valid, text, _ = decode_note(data or b"")
            note_rows.append({RECORD_ID: record.record_id, "patient_id": patient_id, "utf8_valid": valid,
                              "text": text})
        notes = pd.DataFrame(note_rows, columns=[RECORD_ID, "patient_id", "utf8_valid", "text"])
        tables["note"] = validator.validate("note", notes, note_rules(config.min_note_chars))
        _apply(tables["note"], by_id, ledger)

        # Image series (assembled ones)
        by_series_id = {r.record_id: r for r in [*series_records.values(), *nifti_records.values()]}
        tables["image_series"] = validator.validate(
            "image_series", series_table[[RECORD_ID, "patient_id", "series_uid", "n_slices", "hu_min", "hu_max"]],
            series_rules()
        )
        _apply(tables["image_series"], by_series_id, ledger)

        manifest = _assemble_manifest(
            params, raw_dir, interim, ledger, patients, observations, conditions, notes, series_table,
            found.masks, pseudo, identifiers,
        )
        manifest_path = interim / MANIFEST_FILE
        manifest.to_parquet(manifest_path, index=False)

        summary = ledger.summary()
        ledger.write(quarantine, raw_dir)
        ledger.log_warnings(config.max_logged_warnings)
        (report / "gx").mkdir()
        for table, validation in tables.items():
            write_json(report / "gx" / f"{table}.json", validation.result_json)
        report_payload = {
            **summary,
            "manifest_patients": len(manifest),
            "modalities": {k: int(manifest[k].sum()) for k in ("has_image", "has_note", "has_labs")},
            "ignored_bundle_entries": dict(sorted(ehr.ignored_entries.items())),
            "deidentification": {"method": DEID_METHOD, "key": "environment" if key_source.startswith("environment")
                                 else "ephemeral, derived from cohort.json (synthetic data only)"},
            "gx_suites": {
                table: {"success": v.success, "rows": v.n_rows, "expectations": v.expectations}
                for table, v in tables.items()
            },
        }
        assert report_payload["records_in"] == report_payload["accepted"] + report_payload["quarantined"]
        write_json(report / "validation.json", report_payload)
        (report / "validation.html").write_text(_html_summary(summary, tables), encoding="utf-8")

    seconds = time.perf_counter() - started
    LOG.info("ingest: %d records, %d accepted, %d quarantined; %d patients in the manifest (%.1f s)",
             summary["records_in"], summary["accepted"], summary["quarantined"], len(manifest), seconds)
    return IngestResult(
        interim_dir=Path(interim_dir), manifest=Path(interim_dir) / MANIFEST_FILE, n_patients=len(manifest),
        records_in=summary["records_in"], accepted=summary["accepted"], quarantined=summary["quarantined"],
        quarantined_by_reason=summary["quarantined_by_reason"], seconds=round(seconds, 2),
    )


def _assemble_manifest(
    params: Params, raw_dir: Path, interim: Path, ledger: Ledger, patients: pd.DataFrame,
    observations: pd.DataFrame, conditions: pd.DataFrame, notes: pd.DataFrame, series_table: pd.DataFrame,
    mask_paths: list[Path], pseudo: Pseudonymizer, identifiers: dict[str, PatientIdentifiers],
) -> pd.DataFrame:
    """Patient-level decisions (labels, modalities, masks, orphans) and de-identification; one row per patient."""
    accepted_ids = {r.record_id for r in ledger.records if r.accepted}
    record_by_id = {r.record_id: r for r in ledger.records}
    labs = list(params.ingest.lab_units)
    max_age = params.ingest.deid_max_age

    patient_ok = patients[patients[RECORD_ID].isin(accepted_ids)].set_index("patient_id")
    condition_ok = conditions[conditions[RECORD_ID].isin(accepted_ids)]
    labels: dict[str, str] = {}
    for patient_id, group in condition_ok.groupby("patient_id"):
        distinct = sorted(set(group["label"]))
        if len(distinct) > 1:
            for record_id in group[RECORD_ID]:
                ledger.quarantine(record_by_id[record_id], "conflicting_labels",
                                  f"patient {patient_id} has Conditions mapping to {distinct}")
        else:
            labels[str(patient_id)] = distinct[0]

    observation_ok = observations[observations[RECORD_ID].isin(accepted_ids)]
    # several values of one lab: the median (robust to a repeated measurement)
    lab_values = observation_ok.pivot_table(index="patient_id", columns="lab", values="value", aggfunc="median")
    note_ok = notes[notes[RECORD_ID].isin(accepted_ids)].sort_values(RECORD_ID)
    note_text = {str(pid): " ".join(normalise_note(str(t)) for t in group["text"])
                 for pid, group in note_ok.groupby("patient_id")}
    series_ok = series_table[series_table[RECORD_ID].isin(accepted_ids)].set_index("patient_id")

    rows = []
    for patient_id, patient in patient_ok.iterrows():
        record = record_by_id[patient[RECORD_ID]]
        has_image = patient_id in series_ok.index
        has_note = patient_id in note_text
        has_labs = patient_id in lab_values.index and bool(lab_values.loc[patient_id].notna().any())
        if patient_id not in labels:
            ledger.quarantine(record, "missing_label", f"patient {patient_id} has no accepted Condition "
                              "with a mapped ICD-10 code")
            continue
        if not (has_image or has_note or has_labs):
            ledger.quarantine(record, "no_modality", f"patient {patient_id} has no accepted image, note or labs")
            continue
        pseudonym = pseudo.pseudonym(str(patient_id))
        row: dict[str, Any] = {
            "patient_id": pseudonym, "raw_id": patient_id, "site": patient["site"], "label": labels[patient_id],
            "age": cap_age(float(patient["age"]), max_age), "sex": patient["sex"],
        }
        for lab in labs:
            value = lab_values.loc[patient_id, lab] if has_labs and lab in lab_values.columns else np.nan
            row[lab] = float(value)
        who = identifiers.get(patient[RECORD_ID], PatientIdentifiers(str(patient_id)))
        row["image_path"] = None
        row["series_instance_uid"] = None
        row["mask_path"] = None
        if has_image:
            series = series_ok.loc[patient_id]
            source = interim / "images" / f"{pseudo.uid(series['series_uid'])}.nii.gz"
            target = interim / "images" / f"{pseudonym}.nii.gz"
            os.replace(source, target)
            row["image_path"] = str(target.relative_to(interim))
            row["series_instance_uid"] = pseudo.uid(series["series_uid"])
            if isinstance(series["names"], tuple | list) and series["names"]:
                who = who.merged(PatientIdentifiers(str(patient_id), names=tuple(series["names"])))
            if isinstance(series["header"], dict):
                write_json(interim / HEADERS_DIR / f"{pseudonym}.json", series["header"])
            if isinstance(series["mask_file"], str):
                os.replace(interim / "images" / series["mask_file"], interim / "masks" / f"{pseudonym}.nii.gz")
                row["mask_path"] = f"masks/{pseudonym}.nii.gz"
        row["note"] = deidentify_text(note_text[patient_id], who) if has_note else None
        row.update(has_image=has_image, has_note=has_note, has_labs=has_labs)
        rows.append(row)
    manifest = pd.DataFrame(rows, columns=[
        "patient_id", "raw_id", "site", "label", "age", "sex", *labs, "note", "image_path", "series_instance_uid",
        "has_image", "has_note", "has_labs", "mask_path",
    ])
    if not manifest["patient_id"].is_unique:
        raise RuntimeError("two patients share a pseudonym (HMAC truncation collision); widen the pseudonym")
    in_manifest = set(manifest["raw_id"])
    pseudonym_of = dict(zip(manifest["raw_id"], manifest["patient_id"], strict=True))

    # lesion masks: need an accepted image of the same geometry
    geometry = {pid: (tuple(s["shape"]), np.asarray(s["affine"])) for pid, s in series_ok.iterrows()}
    mask_rows: dict[str, str] = {}
    for path in mask_paths:
        patient_id = path.name.removesuffix(".nii.gz")
        relative = str(path.relative_to(raw_dir))
        record = ledger.add(Record("lesion_mask", f"mask/{patient_id}", relative, patient_id=patient_id,
                                   files=(path,)))
        if patient_id not in in_manifest:
            continue  # orphan: decided below with the patient's other records
        if patient_id not in geometry:
            ledger.quarantine(record, "orphan_record", f"patient {patient_id} has no accepted image for this mask")
            continue
        try:
            mask = nib.load(path)
            data = np.asarray(mask.dataobj)
        except Exception as error:
            ledger.quarantine(record, "unreadable_mask", f"cannot read NIfTI: {type(error).__name__}: {error}")
            continue
        shape, affine = geometry[patient_id]
        if data.shape != shape or not np.allclose(mask.affine, affine, atol=1e-3):
            ledger.quarantine(record, "geometry_mismatch", f"mask shape {data.shape} / affine differ from the "
                              f"image ({shape})")
            continue
        if not np.isin(np.unique(data), [0, 1]).all():
            ledger.quarantine(record, "invalid_mask", f"mask values {np.unique(data)[:5]} are not binary")
            continue
        pseudonym = pseudonym_of[patient_id]
        _save_nifti(data.astype(np.uint8), np.asarray(mask.affine), interim / "masks" / f"{pseudonym}.nii.gz")
        mask_rows[pseudonym] = f"masks/{pseudonym}.nii.gz"
    if mask_rows:
        manifest["mask_path"] = manifest["patient_id"].map(mask_rows).fillna(manifest["mask_path"])

    # orphans: every still-accepted record of a patient that is not in the manifest
    patient_reasons = {r.patient_id: r.reason for r in ledger.of_kind("patient") if r.patient_id}
    for record in ledger.records:
        if record.kind in ("patient", "file") or not record.accepted or record.patient_id in in_manifest:
            continue
        why = patient_reasons.get(record.patient_id)
        detail = f"its Patient was quarantined ({why})" if why else "no Patient resource has this id"
        ledger.quarantine(record, "orphan_record", f"record of patient {record.patient_id}: {detail}")
    for leftover in (interim / "images").glob("2.25.*"):  # assembled series that were not kept
        leftover.unlink()
    manifest = manifest.drop(columns=["raw_id"])
    return manifest.sort_values("patient_id").reset_index(drop=True)
