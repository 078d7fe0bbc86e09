"""EHR files -> one record per resource or row: FHIR R4 NDJSON, FHIR Bundles and MIMIC-IV style CSV.

Each resource (FHIR ``Patient``, ``Observation``, ``Condition``, ``DocumentReference``) or CSV row
becomes a record of its kind; a line that is not JSON, a resource of the wrong type or an exact
copy of an earlier item of the same kind is quarantined here. What is kept is parsed into rows later
(:mod:`meddiff.data.ingest.tables`).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meddiff.data import ehr_csv
from meddiff.data.fhir import read_bundle, read_ndjson
from meddiff.data.quarantine import Ledger, Record

#: FHIR resource type -> record kind
EHR_RESOURCES: dict[str, str] = {"Patient": "patient", "Observation": "observation", "Condition": "condition",
                                 "DocumentReference": "note"}
#: source format of an EHR item: a FHIR resource (JSON object) or a MIMIC CSV row (column -> text)
FHIR, CSV = "fhir", "csv"


@dataclass
class EhrRecords:
    """Parsed EHR items per kind: ``(record, resource or row, source format)``."""

    items: dict[str, list[tuple[Record, dict[str, Any], str]]] = field(
        default_factory=lambda: {kind: [] for kind in EHR_RESOURCES.values()})
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


def _read_ndjson(path: Path, ledger: Ledger, raw_dir: Path, ehr: EhrRecords) -> None:
    """``ehr/<Resource>.ndjson``: one record per line, of the resource the file is named after."""
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
            ehr.add(ledger, record, resource, FHIR)


def _read_bundle(path: Path, ledger: Ledger, raw_dir: Path, ehr: EhrRecords) -> None:
    """``ehr/*.json`` Bundle: one record per entry of a read resource type; other types are only counted."""
    relative = str(path.relative_to(raw_dir))
    entries, error = read_bundle(path)
    if error is not None:
        ledger.quarantine(ledger.add_file(path, raw_dir),
                          "wrong_resource_type" if "resourceType" in error else "invalid_json", error)
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
            ehr.add(ledger, record, resource, FHIR)


def _read_csv(path: Path, ledger: Ledger, raw_dir: Path, ehr: EhrRecords) -> None:
    """A MIMIC-IV table (``patients.csv``, ``labevents.csv``, ``diagnoses_icd.csv``): one record per row."""
    relative = str(path.relative_to(raw_dir))
    kind = ehr_csv.MIMIC_TABLES[path.name]
    rows, error = ehr_csv.read_csv_rows(path, ehr_csv.REQUIRED_COLUMNS[path.name])
    if error is not None:
        ledger.quarantine(ledger.add_file(path, raw_dir), "missing_field", error)
        return
    for row in rows:
        subject = (row.row or {}).get("subject_id")
        record = ledger.add(Record(kind, f"{path.stem}@{relative}:{row.line_number}", f"{relative}:{row.line_number}",
                                   patient_id=subject.strip() if kind == "patient" and subject else None,
                                   raw_text=row.text))
        if row.error is not None:
            ledger.quarantine(record, "invalid_json", row.error)
        else:
            ehr.add(ledger, record, row.row, CSV)  # type: ignore[arg-type]


def read_ehr(ndjson: list[Path], bundles: list[Path], csv: list[Path], raw_dir: Path, ledger: Ledger) -> EhrRecords:
    """Read every EHR file, NDJSON first, then Bundles, then CSV (the first copy of a duplicate is kept)."""
    ehr = EhrRecords()
    for paths, read in ((ndjson, _read_ndjson), (bundles, _read_bundle), (csv, _read_csv)):
        for path in paths:
            read(path, ledger, raw_dir, ehr)
    return ehr
