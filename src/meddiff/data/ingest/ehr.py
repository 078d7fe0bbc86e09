"""EHR files -> one record per resource or row: FHIR R4 NDJSON, FHIR Bundles and MIMIC-IV style CSV.

Each resource (FHIR ``Patient``, ``Observation``, ``Condition``, ``DocumentReference``) or CSV row
becomes a record of its kind; a line that is not JSON, a resource of the wrong type or an exact
copy of an earlier item of the same kind is quarantined here. What is kept goes to a callback as it is
read (:class:`meddiff.data.ingest.tables.EhrRows` parses it into a table row), so no parsed resource is
held for the whole drop (issue 14, flat ingest memory).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meddiff.data import ehr_csv
from meddiff.data.fhir import read_bundle, read_ndjson
from meddiff.data.ingest.scratch import ScratchDatabase
from meddiff.data.quarantine import Ledger, Record

#: FHIR resource type -> record kind
EHR_RESOURCES: dict[str, str] = {"Patient": "patient", "Observation": "observation", "Condition": "condition",
                                 "DocumentReference": "note"}
#: source format of an EHR item: a FHIR resource (JSON object) or a MIMIC CSV row (column -> text)
FHIR, CSV = "fhir", "csv"
#: what receives each kept EHR item, in reading order: ``(record, resource or row, source format)``
ItemSink = Callable[[Record, dict[str, Any], str], None]
#: raw texts written to the table at a time
RAW_TEXT_BATCH = 4096


def _encoded(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # a JSON escape can give a lone surrogate


class RawTexts(ScratchDatabase):
    """The raw text of every EHR item (the line, row or entry that ``quarantine.jsonl`` quotes when the item is
    rejected), kept in an SQLite table in a temporary folder instead of on each record: only a few hundred
    of them are ever written, and holding all made ingest's memory grow with the drop (issue 14).
    :meth:`attach` puts the texts on the quarantined records before the ledger is written. Use as a context
    manager (the folder is removed on exit)."""

    def __init__(self) -> None:
        super().__init__("meddiff-ehr-raw-", ("CREATE TABLE raw (record BLOB PRIMARY KEY, text BLOB NOT NULL)",))
        self._pending: list[tuple[bytes, bytes]] = []

    @staticmethod
    def _key(record: Record) -> bytes:
        return _encoded(f"{record.kind}\0{record.record_id}")  # (kind, record id) is unique in a ledger

    def add(self, record: Record, text: str) -> None:
        """Keep ``text`` as the raw text of ``record`` (a record added to the ledger, so added once)."""
        self._pending.append((self._key(record), _encoded(text)))
        if len(self._pending) >= RAW_TEXT_BATCH:
            self._flush()

    def _flush(self) -> None:
        self._db.executemany("INSERT INTO raw VALUES (?, ?)", self._pending)
        self._pending = []

    def attach(self, ledger: Ledger) -> None:
        """Give each quarantined record of ``ledger`` its raw text (records without one are left as they are)."""
        self._flush()
        for record in ledger.records:
            if record.accepted or record.raw_text is not None:
                continue
            found = self._db.execute("SELECT text FROM raw WHERE record = ?", (self._key(record),)).fetchone()
            if found is not None:
                record.raw_text = found[0].decode("utf-8", "surrogatepass")


@dataclass
class EhrRecords:
    """Reads EHR items and hands each kept one (not a duplicate) to ``keep``; counts the Bundle entries not read.
    Raw texts go to ``raw_texts`` (``None``: onto each record)."""

    keep: ItemSink
    raw_texts: RawTexts | None = None
    ignored_entries: Counter = field(default_factory=Counter)
    _seen: dict[tuple[str, bytes], str] = field(default_factory=dict)  # (kind, SHA-256 of canonical JSON)

    def add(self, ledger: Ledger, record: Record, resource: dict[str, Any], fmt: str) -> None:
        """Keep a parsed item; an exact copy of an earlier one (same kind) is a ``duplicate_record``."""
        canonical = json.dumps(resource, sort_keys=True, separators=(",", ":"))
        key = (record.kind, hashlib.sha256(canonical.encode()).digest())
        if key in self._seen:
            ledger.quarantine(record, "duplicate_record", f"exact copy of {self._seen[key]}")
            return
        self._seen[key] = record.source
        self.keep(record, resource, fmt)

    def record(self, ledger: Ledger, record: Record, raw_text: str | None) -> Record:
        """Add ``record`` to ``ledger`` with its raw text (on it, or in :attr:`raw_texts`)."""
        ledger.add(record)
        if raw_text is not None and self.raw_texts is not None:
            self.raw_texts.add(record, raw_text)
        else:
            record.raw_text = raw_text
        return record


def _fhir_record(ehr: EhrRecords, ledger: Ledger, resource: dict[str, Any] | None, resource_type: str,
                 record_id: str, source: str, raw_text: str | None) -> Record:
    kind = EHR_RESOURCES[resource_type]
    subject = resource.get("id") if kind == "patient" and resource else None
    return ehr.record(ledger, Record(kind, record_id, source,
                                     patient_id=subject if isinstance(subject, str) else None), raw_text)


def _read_ndjson(path: Path, ledger: Ledger, raw_dir: Path, ehr: EhrRecords) -> None:
    """``ehr/<Resource>.ndjson``: one record per line, of the resource the file is named after."""
    resource_type = path.stem
    relative = str(path.relative_to(raw_dir))
    for line in read_ndjson(path):
        resource = line.resource or {}
        resource_id = resource.get("id") if isinstance(resource.get("id"), str) else None
        record = _fhir_record(ehr, ledger, resource, resource_type, f"{resource_type}/{resource_id or '?'}@"
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
        record = _fhir_record(ehr, ledger, resource, resource_type if resource else "Patient",
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
        record = ehr.record(ledger, Record(kind, f"{path.stem}@{relative}:{row.line_number}",
                                           f"{relative}:{row.line_number}",
                                           patient_id=subject.strip() if kind == "patient" and subject else None),
                            row.text)
        if row.error is not None:
            ledger.quarantine(record, "invalid_json", row.error)
        else:
            ehr.add(ledger, record, row.row, CSV)  # type: ignore[arg-type]


def read_ehr(ndjson: list[Path], bundles: list[Path], csv: list[Path], raw_dir: Path, ledger: Ledger,
             keep: ItemSink, raw_texts: RawTexts | None = None) -> EhrRecords:
    """Read every EHR file, NDJSON first, then Bundles, then CSV (the first copy of a duplicate is kept);
    each kept item goes to ``keep`` as it is read, each raw text to ``raw_texts`` (``None``: onto its record)."""
    ehr = EhrRecords(keep, raw_texts)
    for paths, read in ((ndjson, _read_ndjson), (bundles, _read_bundle), (csv, _read_csv)):
        for path in paths:
            read(path, ledger, raw_dir, ehr)
    return ehr
