"""Clinical notes -> the note table: ``notes/<patient>.txt`` files and FHIR DocumentReference attachments.

A text file is a ``note`` record named after its patient; a DocumentReference was already a record
(:mod:`meddiff.data.ingest.ehr`) and is quarantined here when it has no inline text/plain attachment.
Text is decoded (``utf8_valid`` false for bytes that are not UTF-8) and judged by the note suite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from meddiff.data.fhir import document_note
from meddiff.data.notes import decode_note
from meddiff.data.quarantine import Ledger, Record
from meddiff.data.validation import RECORD_ID

NOTE_COLUMNS = [RECORD_ID, "patient_id", "utf8_valid", "text"]


def _note_row(record: Record, patient_id: str | None, data: bytes) -> dict[str, Any]:
    valid, text, _ = decode_note(data)
    return {RECORD_ID: record.record_id, "patient_id": patient_id, "utf8_valid": valid, "text": text}


def read_document(record: Record, resource: dict[str, Any], ledger: Ledger) -> tuple[Record, bytes] | None:
    """A DocumentReference's record (which learns its patient) and note bytes; ``None`` when it has no inline
    text/plain attachment (then the record is quarantined with the reason)."""
    patient_id, data, problem = document_note(resource)
    record.patient_id = patient_id
    if problem is not None:
        reason, _, message = problem.partition(": ")
        ledger.quarantine(record, reason, message)
        return None
    return record, data or b""


def note_table(note_files: list[Path], documents: list[tuple[Record, bytes]], raw_dir: Path,
               ledger: Ledger) -> pd.DataFrame:
    """One row per note (``NOTE_COLUMNS``): text files first, then the DocumentReferences'
    (:func:`read_document`) in reading order."""
    rows = []
    for path in note_files:
        record = ledger.add(Record("note", f"note/{path.stem}", str(path.relative_to(raw_dir)),
                                   patient_id=path.stem, files=(path,)))
        rows.append(_note_row(record, path.stem, path.read_bytes()))
    for record, data in documents:
        rows.append(_note_row(record, record.patient_id, data))
    return pd.DataFrame(rows, columns=NOTE_COLUMNS)
