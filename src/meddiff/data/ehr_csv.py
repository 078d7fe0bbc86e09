"""MIMIC-IV style CSV tables (``hosp`` module) as an alternative to FHIR: ``ehr/patients.csv``,
``ehr/labevents.csv`` and ``ehr/diagnoses_icd.csv`` (https://mimic.mit.edu/docs/iv/modules/hosp/).

* ``patients.csv``: ``subject_id``, ``gender`` (M/F), ``anchor_age`` (age in the anchor year; MIMIC
  has no birth dates) -> a Patient row; the site is ``ingest.mimic_site``.
* ``labevents.csv``: ``subject_id``, ``itemid``, ``valuenum``, ``valueuom`` -> an Observation row;
  ``ingest.mimic_lab_itemids`` maps itemids onto the canonical labs and MIMIC's units are written as
  UCUM (``K/uL`` = ``10*3/uL``; an empty unit is accepted for dimensionless labs such as INR), then
  harmonised like FHIR quantities (:func:`meddiff.data.fhir.harmonise`).
* ``diagnoses_icd.csv``: ``subject_id``, ``icd_code`` (without the dot), ``icd_version`` -> a Condition
  row; ICD-10 codes get their dot back (``I639`` -> ``I63.9``); ICD-9 codes are not mapped.

Rows are streamed with :mod:`csv` (no whole-table load); each row is one record.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meddiff.data.fhir import UNIT_ALIASES, harmonise, icd10_class, icd10_dotted

#: file name -> record kind
MIMIC_TABLES: dict[str, str] = {"patients.csv": "patient", "labevents.csv": "observation",
                                "diagnoses_icd.csv": "condition"}
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "patients.csv": ("subject_id", "gender", "anchor_age"),
    "labevents.csv": ("subject_id", "itemid", "valuenum", "valueuom"),
    "diagnoses_icd.csv": ("subject_id", "icd_code", "icd_version"),
}
DIMENSIONLESS: frozenset[str] = frozenset({"{INR}", "1", "{ratio}"})
SEX: dict[str, str] = {"M": "male", "F": "female"}


@dataclass(frozen=True)
class CsvRow:
    """One data row: its line number (header = 1), its text for the quarantine, the row or the error."""

    line_number: int
    text: str
    row: dict[str, str] | None
    error: str | None


def read_csv_rows(path: Path, required: tuple[str, ...]) -> tuple[Iterator[CsvRow], str | None]:
    """Stream the rows of a CSV table; a missing required column is a file-level error."""
    handle = open(path, encoding="utf-8", errors="replace", newline="")  # noqa: SIM115 - closed by the generator
    reader = csv.DictReader(handle)
    columns = reader.fieldnames or []
    missing = [c for c in required if c not in columns]
    if missing:
        handle.close()
        return iter(()), f"{path.name} lacks columns {missing} (has {columns})"

    def rows() -> Iterator[CsvRow]:
        with handle:
            for row in reader:
                text = json.dumps(row, sort_keys=True)
                if None in row or any(v is None for v in row.values()):
                    yield CsvRow(reader.line_num, text, None, f"row has {len(row)} fields, header has {len(columns)}")
                else:
                    yield CsvRow(reader.line_num, text, row, None)

    return rows(), None


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def patient_row(row: dict[str, str], site: str) -> dict[str, Any]:
    gender = row.get("gender", "").strip()
    return {"patient_id": row.get("subject_id", "").strip() or None, "sex": SEX.get(gender, gender.lower() or None),
            "birth_date": None, "age": _float(row.get("anchor_age")), "site": site}


def lab_row(row: dict[str, str], lab_by_itemid: dict[int, str], lab_units: dict[str, str]) -> dict[str, Any]:
    """A labevents row as an observation row (same columns as :func:`meddiff.data.fhir.observation_row`)."""
    try:
        itemid = int(row.get("itemid", ""))
    except ValueError:
        itemid = None
    lab = lab_by_itemid.get(itemid) if itemid is not None else None
    raw_unit = (row.get("valueuom") or "").strip()
    unit = UNIT_ALIASES.get(raw_unit, raw_unit)
    raw_value = _float(row.get("valuenum"))
    value = None
    if lab is not None and raw_value is not None:
        canonical = lab_units[lab]
        if not unit and canonical in DIMENSIONLESS:
            unit = canonical
        value = harmonise(lab, raw_value, unit, canonical) if unit else None
    return {"observation_id": f"labevents:{row.get('labevent_id') or ''}:{row.get('subject_id')}:{itemid}:"
                              f"{row.get('charttime', '')}",
            "patient_id": row.get("subject_id", "").strip() or None, "loinc": f"itemid:{itemid}", "lab": lab,
            "raw_value": raw_value, "unit": raw_unit or None, "value": value}


def condition_row(row: dict[str, str], icd10_to_class: dict[str, str]) -> dict[str, Any]:
    version = (row.get("icd_version") or "").strip()
    code = (row.get("icd_code") or "").strip()
    icd10 = icd10_dotted(code) if version == "10" else None
    return {"condition_id": f"diagnoses_icd:{row.get('subject_id')}:{row.get('hadm_id', '')}:{row.get('seq_num', '')}",
            "patient_id": row.get("subject_id", "").strip() or None,
            "icd10": icd10 if icd10 else f"ICD-{version or '?'} {code}",
            "label": icd10_class(icd10, icd10_to_class) if icd10 else None}
