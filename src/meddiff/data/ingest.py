"""``meddiff ingest``: raw DICOM / FHIR R4 NDJSON / notes -> validated interim data + quarantine.

Every input item becomes one record (:mod:`meddiff.data.quarantine`) of a kind: ``image_series``
(a DICOM series, PS3.3 C.7.3), ``lesion_mask``, ``patient``, ``observation``, ``condition`` (FHIR R4
resources), ``note`` and stray ``file``. Records are checked in two layers: structural checks while
reading (DICOM geometry, JSON, UTF-8) and great-expectations suites per table
(:mod:`meddiff.data.validation`), which name exactly the failing rows. A patient enters
``interim_dir/manifest.parquet`` when its Patient record is accepted, it has a diagnosis label and at
least one accepted modality; records of rejected patients are quarantined as ``orphan_record``. One bad
record never stops the stage.
"""

from __future__ import annotations

import datetime
import html
import logging
import multiprocessing
import os
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from meddiff.config import Params
from meddiff.data.dicom import FileProblem, SeriesError, SliceHeader, load_series, read_headers
from meddiff.data.fhir import condition_row, observation_row, patient_row, read_ndjson
from meddiff.data.notes import normalise_note, read_note
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
#: files at the top of raw_dir that describe the drop rather than hold records
PROVENANCE_FILES = frozenset({"cohort.json", "README.md", "README.txt"})
EHR_RESOURCES: dict[str, str] = {"Patient": "patient", "Observation": "observation", "Condition": "condition"}


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


# --------------------------------------------------------------------------------------------- imaging


def _assemble_series(task: tuple[str, list[SliceHeader], Path]) -> dict[str, Any]:
    """Worker: load one series and write it as NIfTI (RAS); return a row or the rejection."""
    series_uid, headers, target = task
    try:
        volume = load_series(headers)
    except SeriesError as error:
        return {"series_uid": series_uid, "error": (error.reason, error.message)}
    image = nib.Nifti1Image(volume.hu.astype(np.float32), volume.affine)
    image.set_qform(volume.affine, code=1)
    image.set_sform(volume.affine, code=1)
    image.header.set_xyzt_units("mm")
    nib.save(image, target)
    return {
        "series_uid": series_uid, "error": None, "n_slices": int(volume.hu.shape[2]),
        "hu_min": float(volume.hu.min()), "hu_max": float(volume.hu.max()),
        "shape": list(volume.hu.shape), "affine": volume.affine.tolist(),
        "spacing_mm": [float(s) for s in volume.spacing_mm],
    }


def _pool(workers: int) -> Any:
    return multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None


def _chunks(items: list[Path], size: int) -> list[list[Path]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _ingest_imaging(
    raw_dir: Path, files: list[Path], images_dir: Path, ledger: Ledger, workers: int
) -> tuple[pd.DataFrame, dict[str, Record]]:
    """DICOM files -> series records (+ NIfTI written for assembled ones); returns the series table."""
    pool = _pool(workers)
    try:
        chunks = _chunks(sorted(files), 64)
        results = pool.map(read_headers, chunks) if pool else [read_headers(c) for c in chunks]
        headers: list[SliceHeader] = []
        for batch in results:
            for item in batch:
                if isinstance(item, FileProblem):
                    record = ledger.add(Record("file", f"file/{item.path.relative_to(raw_dir)}",
                                               str(item.path.relative_to(raw_dir)), files=(item.path,)))
                    ledger.quarantine(record, item.reason, item.message)
                else:
                    headers.append(item)
        series: dict[str, list[SliceHeader]] = defaultdict(list)
        for header in headers:
            series[header.series_instance_uid].append(header)
        records: dict[str, Record] = {}
        tasks = []
        for series_uid, members in sorted(series.items()):
            members.sort(key=lambda h: str(h.path))
            patient_ids = sorted({h.patient_id for h in members})
            source = str(members[0].path.parent.relative_to(raw_dir))
            record = ledger.add(Record("image_series", f"series/{series_uid}", source,
                                       patient_id=patient_ids[0] or None,
                                       files=tuple(h.path for h in members)))
            records[series_uid] = record
            modalities = sorted({h.modality for h in members})
            studies = sorted({h.study_instance_uid for h in members})
            if len(patient_ids) > 1:
                ledger.quarantine(record, "inconsistent_patient", f"series mixes PatientIDs {patient_ids}")
            elif len(studies) > 1:
                ledger.quarantine(record, "inconsistent_study", f"series spans StudyInstanceUIDs {studies}")
            elif modalities != ["CT"]:
                ledger.quarantine(record, "unsupported_modality", f"Modality {modalities}, expected CT")
            else:
                tasks.append((series_uid, members, images_dir / f"{series_uid}.nii.gz"))
        assembled = pool.map(_assemble_series, tasks) if pool else [_assemble_series(t) for t in tasks]
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    rows = []
    for outcome in assembled:
        record = records[outcome["series_uid"]]
        if outcome["error"] is not None:
            ledger.quarantine(record, *outcome["error"])
            continue
        rows.append({RECORD_ID: record.record_id, "patient_id": record.patient_id, **{
            k: v for k, v in outcome.items() if k != "error"
        }})
    columns = [RECORD_ID, "patient_id", "series_uid", "n_slices", "hu_min", "hu_max", "shape", "affine",
               "spacing_mm"]
    return pd.DataFrame(rows, columns=columns), records


# ------------------------------------------------------------------------------------------------ EHR


def _ingest_ehr_file(path: Path, resource_type: str, ledger: Ledger, raw_dir: Path) -> list[tuple[Record, dict]]:
    """Parse one NDJSON file into records; structural problems and exact duplicates are quarantined."""
    kind = EHR_RESOURCES[resource_type]
    seen: dict[str, str] = {}
    parsed = []
    relative = str(path.relative_to(raw_dir))
    for line in read_ndjson(path):
        resource = line.resource or {}
        resource_id = resource.get("id") if isinstance(resource.get("id"), str) else None
        record_id = f"{resource_type}/{resource_id or '?'}@L{line.line_number}"
        subject = resource.get("id") if kind == "patient" else None
        record = ledger.add(Record(kind, record_id, f"{relative}:{line.line_number}", patient_id=subject,
                                   raw_text=line.text))
        if line.error is not None:
            ledger.quarantine(record, "invalid_json", line.error)
        elif resource.get("resourceType") != resource_type:
            ledger.quarantine(record, "wrong_resource_type",
                              f"resourceType {resource.get('resourceType')!r} in {path.name}, expected {resource_type}")
        elif line.text in seen:
            ledger.quarantine(record, "duplicate_record", f"exact copy of line {seen[line.text]}")
        else:
            seen[line.text] = str(line.line_number)
            parsed.append((record, resource))
    return parsed


def _apply(validation: TableValidation, by_id: dict[str, Record], ledger: Ledger) -> None:
    for record_id, (reason, message) in validation.failures.items():
        ledger.quarantine(by_id[record_id], reason, message)


# ------------------------------------------------------------------------------------------------ stage


def _inventory(raw_dir: Path, ledger: Ledger) -> dict[str, list[Path]]:
    """Sort the raw tree into DICOM candidates, masks, NDJSON, notes; anything else is a stray file."""
    groups: dict[str, list[Path]] = {"imaging": [], "masks": [], "ehr": [], "notes": []}
    for path in sorted(p for p in raw_dir.rglob("*") if p.is_file()):
        relative = path.relative_to(raw_dir)
        top = relative.parts[0]
        if len(relative.parts) == 1 and relative.name in PROVENANCE_FILES:
            continue
        if top == "imaging":
            groups["imaging"].append(path)
        elif top == "masks" and path.name.endswith(".nii.gz") and len(relative.parts) == 2:
            groups["masks"].append(path)
        elif top == "ehr" and path.suffix == ".ndjson" and path.stem in EHR_RESOURCES:
            groups["ehr"].append(path)
        elif top == "notes" and path.suffix == ".txt" and len(relative.parts) == 2:
            groups["notes"].append(path)
        else:
            record = ledger.add(Record("file", f"file/{relative}", str(relative), files=(path,)))
            ledger.quarantine(record, "unexpected_file", f"{relative} is not part of the raw layout "
                              "(imaging/, masks/, ehr/<Resource>.ndjson, notes/<patient>.txt)")
    return groups


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


def run_ingest(
    params: Params, raw_dir: Path, interim_dir: Path, quarantine_dir: Path, report_dir: Path
) -> IngestResult:
    """Read, validate and quarantine the raw drop; write the interim manifest, images and masks."""
    started = time.perf_counter()
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"{raw_dir}: raw data directory not found; run `meddiff cohort` first")
    config = params.ingest
    class_names = list(params.cohort.classes)
    unknown_classes = sorted(set(config.icd10_to_class.values()) - set(class_names))
    if unknown_classes:
        raise ValueError(f"ingest.icd10_to_class maps to {unknown_classes}, not in cohort.classes {class_names}")
    reference_date = datetime.date.fromisoformat(config.reference_date)
    workers = max(1, min(os.cpu_count() or 1, 8))
    ledger = Ledger()
    groups = _inventory(raw_dir, ledger)

    with (
        atomic_dir(interim_dir) as interim,
        atomic_dir(quarantine_dir) as quarantine,
        atomic_dir(report_dir) as report,
    ):
        images_dir, masks_dir = interim / "images", interim / "masks"
        images_dir.mkdir()
        masks_dir.mkdir()
        # imaging first: worker processes fork before great-expectations is imported
        series_table, series_records = _ingest_imaging(raw_dir, groups["imaging"], images_dir, ledger, workers)
        LOG.info("ingest: %d DICOM files -> %d series (%.1f s)", len(groups["imaging"]), len(series_records),
                 time.perf_counter() - started)

        validator = TableValidator()
        tables: dict[str, TableValidation] = {}
        parsed = {resource: [] for resource in EHR_RESOURCES}
        for path in groups["ehr"]:
            parsed[path.stem].extend(_ingest_ehr_file(path, path.stem, ledger, raw_dir))

        # Patient
        patient_rows, by_id = [], {}
        for record, resource in parsed["Patient"]:
            by_id[record.record_id] = record
            patient_rows.append({RECORD_ID: record.record_id, **patient_row(resource, reference_date)})
        patients = pd.DataFrame(patient_rows, columns=[RECORD_ID, "patient_id", "sex", "birth_date", "age", "site"])
        tables["patient"] = validator.validate("patient", patients, patient_rules(config.age_range))
        _apply(tables["patient"], by_id, ledger)

        # Observation
        lab_by_loinc = {code: lab for lab, codes in config.lab_loinc.items() for code in codes}
        observation_rows = []
        for record, resource in parsed["Observation"]:
            row = observation_row(resource, lab_by_loinc, config.lab_units)
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
        for record, resource in parsed["Condition"]:
            row = condition_row(resource, config.icd10_to_class)
            record.patient_id = row["patient_id"]
            by_id[record.record_id] = record
            condition_rows.append({RECORD_ID: record.record_id, **row})
        conditions = pd.DataFrame(condition_rows, columns=[RECORD_ID, "condition_id", "patient_id", "icd10", "label"])
        tables["condition"] = validator.validate("condition", conditions, condition_rules(class_names))
        _apply(tables["condition"], by_id, ledger)

        # Notes
        note_rows = []
        for path in groups["notes"]:
            note = read_note(path)
            relative = str(path.relative_to(raw_dir))
            record = ledger.add(Record("note", f"note/{note.patient_id}", relative, patient_id=note.patient_id,
                                       files=(path,)))
            by_id[record.record_id] = record
            note_rows.append({RECORD_ID: record.record_id, "patient_id": note.patient_id,
                              "utf8_valid": note.utf8_valid, "text": note.text})
        notes = pd.DataFrame(note_rows, columns=[RECORD_ID, "patient_id", "utf8_valid", "text"])
        tables["note"] = validator.validate("note", notes, note_rules(config.min_note_chars))
        _apply(tables["note"], by_id, ledger)

        # Image series (assembled ones)
        by_series_id = {r.record_id: r for r in series_records.values()}
        tables["image_series"] = validator.validate(
            "image_series", series_table.drop(columns=["shape", "affine", "spacing_mm"]), series_rules()
        )
        _apply(tables["image_series"], by_series_id, ledger)

        manifest = _assemble_manifest(
            params, raw_dir, interim, ledger, patients, observations, conditions, notes, series_table,
            by_series_id, groups["masks"],
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
    series_by_id: dict[str, Record], mask_paths: list[Path],
) -> pd.DataFrame:
    """Patient-level decisions: labels, modalities, masks, orphans; one manifest row per patient."""
    accepted_ids = {r.record_id for r in ledger.records if r.accepted}
    record_by_id = {r.record_id: r for r in ledger.records}
    labs = list(params.ingest.lab_units)

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
    note_ok = notes[notes[RECORD_ID].isin(accepted_ids)].set_index("patient_id")
    series_ok = series_table[series_table[RECORD_ID].isin(accepted_ids)].set_index("patient_id")

    rows = []
    for patient_id, patient in patient_ok.iterrows():
        record = record_by_id[patient[RECORD_ID]]
        has_image = patient_id in series_ok.index
        has_note = patient_id in note_ok.index
        has_labs = patient_id in lab_values.index and bool(lab_values.loc[patient_id].notna().any())
        if patient_id not in labels:
            ledger.quarantine(record, "missing_label", f"patient {patient_id} has no accepted Condition "
                              "with a mapped ICD-10 code")
            continue
        if not (has_image or has_note or has_labs):
            ledger.quarantine(record, "no_modality", f"patient {patient_id} has no accepted image, note or labs")
            continue
        row: dict[str, Any] = {
            "patient_id": patient_id, "site": patient["site"], "label": labels[patient_id],
            "age": float(patient["age"]), "sex": patient["sex"],
        }
        for lab in labs:
            value = lab_values.loc[patient_id, lab] if has_labs and lab in lab_values.columns else np.nan
            row[lab] = float(value)
        row["note"] = normalise_note(str(note_ok.loc[patient_id, "text"])) if has_note else None
        row["image_path"] = None
        row["series_instance_uid"] = None
        if has_image:
            series = series_ok.loc[patient_id]
            target = interim / "images" / f"{patient_id}.nii.gz"
            os.replace(interim / "images" / f"{series['series_uid']}.nii.gz", target)
            row["image_path"] = str(target.relative_to(interim))
            row["series_instance_uid"] = series["series_uid"]
        row.update(has_image=has_image, has_note=has_note, has_labs=has_labs, mask_path=None)
        rows.append(row)
    manifest = pd.DataFrame(rows, columns=[
        "patient_id", "site", "label", "age", "sex", *labs, "note", "image_path", "series_instance_uid",
        "has_image", "has_note", "has_labs", "mask_path",
    ])
    in_manifest = set(manifest["patient_id"])

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
        shutil.copyfile(path, interim / "masks" / f"{patient_id}.nii.gz")
        mask_rows[patient_id] = f"masks/{patient_id}.nii.gz"
    manifest["mask_path"] = manifest["patient_id"].map(mask_rows)

    # orphans: every still-accepted record of a patient that is not in the manifest
    patient_reasons = {r.patient_id: r.reason for r in ledger.of_kind("patient") if r.patient_id}
    for record in ledger.records:
        if record.kind in ("patient", "file") or not record.accepted or record.patient_id in in_manifest:
            continue
        why = patient_reasons.get(record.patient_id)
        detail = f"its Patient was quarantined ({why})" if why else "no Patient resource has this id"
        ledger.quarantine(record, "orphan_record", f"record of patient {record.patient_id}: {detail}")
    for series_uid in series_table["series_uid"]:  # NIfTI of series that were assembled but not kept
        (interim / "images" / f"{series_uid}.nii.gz").unlink(missing_ok=True)
    return manifest.sort_values("patient_id").reset_index(drop=True)
