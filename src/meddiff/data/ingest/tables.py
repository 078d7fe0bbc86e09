"""The tables the great-expectations suites judge, and the one loop that validates them.

Each table is a :class:`TableSpec`: the record kind (which is also the suite's table name), one row
per record and the rules of :mod:`meddiff.data.validation`. :func:`validate_tables` runs the suites
in the given order and quarantines exactly the failing records. The EHR tables are built here from
FHIR resources or MIMIC CSV rows, harmonised to canonical units and diagnosis classes.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from meddiff.config import DatasetConfig, IngestConfig
from meddiff.data import ehr_csv
from meddiff.data.deid import PatientIdentifiers, identifiers_from_patient
from meddiff.data.fhir import condition_row, observation_row, patient_row
from meddiff.data.ingest.ehr import CSV
from meddiff.data.quarantine import Ledger, Record
from meddiff.data.validation import RECORD_ID, Rule, TableValidation, TableValidator

PATIENT_COLUMNS = [RECORD_ID, "patient_id", "sex", "birth_date", "birth_date_invalid", "age", "site"]
OBSERVATION_COLUMNS = [RECORD_ID, "observation_id", "patient_id", "loinc", "lab", "raw_value", "unit", "value"]
CONDITION_COLUMNS = [RECORD_ID, "condition_id", "patient_id", "icd10", "label"]

EhrItems = list[tuple[Record, dict[str, Any], str]]
RowParser = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class TableSpec:
    """One table to validate: record kind (= suite table name), one row per record, the suite's rules."""

    kind: str
    frame: pd.DataFrame
    rules: list[Rule]


def validate_tables(specs: Sequence[TableSpec], ledger: Ledger) -> dict[str, TableValidation]:
    """Run each suite in order; quarantine every failing record with the rule's reason. Results by kind."""
    validator = TableValidator()  # imports great_expectations: only after the imaging workers have forked
    validations: dict[str, TableValidation] = {}
    for spec in specs:
        validation = validator.validate(spec.kind, spec.frame, spec.rules)
        for record_id, (reason, message) in validation.failures.items():
            ledger.quarantine(ledger.get(spec.kind, record_id), reason, message)
        validations[spec.kind] = validation
    return validations


def _ehr_table(items: EhrItems, columns: list[str], from_fhir: RowParser, from_csv: RowParser,
               ledger: Ledger) -> pd.DataFrame:
    """One row per item, parsed by its source format; each record learns its patient from its row.

    The parsers read every JSON shape they know; an item they still cannot read (an unexpected type deep
    in a resource) is quarantined as ``invalid_resource`` with the error, and the other items go on.
    """
    rows = []
    for record, resource, fmt in items:
        try:
            row = from_csv(resource) if fmt == CSV else from_fhir(resource)
        except (AttributeError, TypeError, ValueError, KeyError) as error:
            ledger.quarantine(record, "invalid_resource", f"cannot read the resource: {type(error).__name__}: {error}")
            continue
        record.patient_id = row["patient_id"]
        rows.append({RECORD_ID: record.record_id, **row})
    return pd.DataFrame(rows, columns=columns)


def patient_table(items: EhrItems, config: IngestConfig, reference_date: datetime.date,
                  ledger: Ledger) -> pd.DataFrame:
    """Patients (``PATIENT_COLUMNS``): age in years at ``reference_date``; MIMIC rows get ``config.mimic_site``."""
    return _ehr_table(items, PATIENT_COLUMNS, lambda resource: patient_row(resource, reference_date),
                      lambda row: {**ehr_csv.patient_row(row, config.mimic_site), "birth_date_invalid": None}, ledger)


def patient_identifiers(items: EhrItems) -> dict[str, PatientIdentifiers]:
    """Names and other identifiers of each FHIR Patient by record id (scrubbed from that patient's notes)."""
    return {record.record_id: identifiers_from_patient(resource) for record, resource, fmt in items if fmt != CSV}


def observation_table(items: EhrItems, dataset: DatasetConfig, ledger: Ledger) -> pd.DataFrame:
    """Lab results (``OBSERVATION_COLUMNS``) in the units of ``dataset.features``, plus one value column per feature.

    The per-lab columns let a range rule see only its own lab (the other labs' rows are NaN there).
    """
    lab_by_loinc, lab_by_itemid, units = dataset.feature_by_loinc, dataset.feature_by_itemid, dataset.feature_units
    frame = _ehr_table(items, OBSERVATION_COLUMNS,
                       lambda resource: observation_row(resource, lab_by_loinc, units),
                       lambda row: ehr_csv.lab_row(row, lab_by_itemid, units), ledger)
    for lab in units:
        frame[lab] = frame["value"].where(frame["lab"] == lab).astype(float)
    return frame


def condition_table(items: EhrItems, dataset: DatasetConfig, ledger: Ledger) -> pd.DataFrame:
    """Diagnoses (``CONDITION_COLUMNS``): ICD-10 code and the class of ``dataset.classes`` it maps to."""
    icd10_to_class = dataset.icd10_to_class
    return _ehr_table(items, CONDITION_COLUMNS, lambda resource: condition_row(resource, icd10_to_class),
                      lambda row: ehr_csv.condition_row(row, icd10_to_class), ledger)
