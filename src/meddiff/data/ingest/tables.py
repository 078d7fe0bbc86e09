"""The tables the great-expectations suites judge, and the one loop that validates them.

Each table is a :class:`TableSpec`: the record kind (which is also the suite's table name), one row
per record and the rules of :mod:`meddiff.data.validation`. :func:`validate_tables` runs the suites
in the given order and quarantines exactly the failing records. The EHR tables are built here from
FHIR resources or MIMIC CSV rows, harmonised to canonical units and diagnosis classes; during ingest
each item is parsed into a compact row as it is read (:class:`EhrRows`), not held as a resource.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from meddiff.config import DatasetConfig, IngestConfig
from meddiff.data import ehr_csv
from meddiff.data.deid import PatientIdentifiers, identifiers_from_patient
from meddiff.data.fhir import condition_row, observation_row, patient_row
from meddiff.data.ingest.ehr import CSV
from meddiff.data.ingest.notes import read_document
from meddiff.data.quarantine import Ledger, Record
from meddiff.data.validation import RECORD_ID, Rule, TableValidation, TableValidator

PATIENT_COLUMNS = [RECORD_ID, "patient_id", "sex", "birth_date", "birth_date_invalid", "age", "site"]
OBSERVATION_COLUMNS = [RECORD_ID, "observation_id", "patient_id", "loinc", "lab", "raw_value", "unit", "value"]
CONDITION_COLUMNS = [RECORD_ID, "condition_id", "patient_id", "icd10", "label"]

EhrItems = list[tuple[Record, dict[str, Any], str]]
RowParser = Callable[[dict[str, Any]], dict[str, Any]]
#: how the items of one kind become rows: (columns, parser of a FHIR resource, parser of a MIMIC CSV row)
TableParsers = tuple[list[str], RowParser, RowParser]


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


def _row(record: Record, resource: dict[str, Any], fmt: str, parsers: TableParsers,
         ledger: Ledger) -> tuple[Any, ...] | None:
    """The item's row (values in the order of the parsers' columns; a column the parser leaves out is NaN,
    as ``pd.DataFrame`` fills it from dicts); the record learns its patient from the row.

    The parsers read every JSON shape they know; an item they still cannot read (an unexpected type deep
    in a resource) is quarantined as ``invalid_resource`` with the error (``None``), and the other items go on.
    """
    columns, from_fhir, from_csv = parsers
    try:
        row = from_csv(resource) if fmt == CSV else from_fhir(resource)
    except (AttributeError, TypeError, ValueError, KeyError) as error:
        ledger.quarantine(record, "invalid_resource", f"cannot read the resource: {type(error).__name__}: {error}")
        return None
    record.patient_id = row["patient_id"]
    row[RECORD_ID] = record.record_id
    return tuple(row.get(column, np.nan) for column in columns)


def _table(rows: list[tuple[Any, ...]], columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=columns)


def _ehr_table(items: EhrItems, parsers: TableParsers, ledger: Ledger) -> pd.DataFrame:
    """One row per item, parsed by its source format (:func:`_row`)."""
    rows = [row for record, resource, fmt in items if (row := _row(record, resource, fmt, parsers, ledger)) is not None]
    return _table(rows, parsers[0])


def patient_parsers(config: IngestConfig, reference_date: datetime.date) -> TableParsers:
    """Patients (``PATIENT_COLUMNS``): age in years at ``reference_date``; MIMIC rows get ``config.mimic_site``."""
    return (PATIENT_COLUMNS, lambda resource: patient_row(resource, reference_date),
            lambda row: {**ehr_csv.patient_row(row, config.mimic_site), "birth_date_invalid": None})


def observation_parsers(dataset: DatasetConfig) -> TableParsers:
    """Lab results (``OBSERVATION_COLUMNS``) in the units of ``dataset.features``."""
    lab_by_loinc, lab_by_itemid, units = dataset.feature_by_loinc, dataset.feature_by_itemid, dataset.feature_units
    return (OBSERVATION_COLUMNS, lambda resource: observation_row(resource, lab_by_loinc, units),
            lambda row: ehr_csv.lab_row(row, lab_by_itemid, units))


def condition_parsers(dataset: DatasetConfig) -> TableParsers:
    """Diagnoses (``CONDITION_COLUMNS``): ICD-10 code and the class of ``dataset.classes`` it maps to."""
    icd10_to_class = dataset.icd10_to_class
    return (CONDITION_COLUMNS, lambda resource: condition_row(resource, icd10_to_class),
            lambda row: ehr_csv.condition_row(row, icd10_to_class))


def with_lab_columns(observations: pd.DataFrame, dataset: DatasetConfig) -> pd.DataFrame:
    """Add one value column per feature of ``dataset`` to the observation table: a range rule then sees only
    its own lab (the other labs' rows are NaN there)."""
    for lab in dataset.feature_units:
        observations[lab] = observations["value"].where(observations["lab"] == lab).astype(float)
    return observations


def patient_table(items: EhrItems, config: IngestConfig, reference_date: datetime.date,
                  ledger: Ledger) -> pd.DataFrame:
    """Patients (``PATIENT_COLUMNS``, :func:`patient_parsers`) of ``items``."""
    return _ehr_table(items, patient_parsers(config, reference_date), ledger)


def patient_identifiers(items: EhrItems) -> dict[str, PatientIdentifiers]:
    """Names and other identifiers of each FHIR Patient by record id (scrubbed from that patient's notes)."""
    return {record.record_id: identifiers_from_patient(resource) for record, resource, fmt in items if fmt != CSV}


def observation_table(items: EhrItems, dataset: DatasetConfig, ledger: Ledger) -> pd.DataFrame:
    """Lab results of ``items`` (:func:`observation_parsers`), plus one value column per feature."""
    return with_lab_columns(_ehr_table(items, observation_parsers(dataset), ledger), dataset)


def condition_table(items: EhrItems, dataset: DatasetConfig, ledger: Ledger) -> pd.DataFrame:
    """Diagnoses of ``items`` (:func:`condition_parsers`)."""
    return _ehr_table(items, condition_parsers(dataset), ledger)


@dataclass
class EhrRows:
    """The EHR tables of one ingest, filled item by item as the EHR is read (:func:`keep` is the
    :data:`~meddiff.data.ingest.ehr.ItemSink`): each resource or CSV row becomes a row tuple at once, a FHIR
    Patient also its identifiers and a DocumentReference its note bytes, and the parsed resource is dropped
    (issue 14: holding every resource made ingest's memory grow with the drop). Rows, quarantines and
    patients are those of :func:`patient_table`, :func:`observation_table`, :func:`condition_table`,
    :func:`patient_identifiers` and :func:`~meddiff.data.ingest.notes.note_table` over the same items."""

    ledger: Ledger
    parsers: dict[str, TableParsers]  # record kind -> how its items become rows
    rows: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)
    identifiers: dict[str, PatientIdentifiers] = field(default_factory=dict)  # FHIR Patient record id -> ...
    documents: list[tuple[Record, bytes]] = field(default_factory=list)  # DocumentReferences with a note

    @classmethod
    def for_ingest(cls, ledger: Ledger, config: IngestConfig, dataset: DatasetConfig,
                   reference_date: datetime.date) -> EhrRows:
        """The patient, observation and condition tables of ``ingest`` (``dataset``'s labs and classes)."""
        return cls(ledger, {"patient": patient_parsers(config, reference_date),
                            "observation": observation_parsers(dataset), "condition": condition_parsers(dataset)})

    def keep(self, record: Record, resource: dict[str, Any], fmt: str) -> None:
        """Parse one kept EHR item into its table (a DocumentReference: into :attr:`documents`)."""
        if record.kind == "note":
            document = read_document(record, resource, self.ledger)
            if document is not None:
                self.documents.append(document)
            return
        if record.kind == "patient" and fmt != CSV:
            self.identifiers[record.record_id] = identifiers_from_patient(resource)
        row = _row(record, resource, fmt, self.parsers[record.kind], self.ledger)
        if row is not None:
            self.rows.setdefault(record.kind, []).append(row)

    def table(self, kind: str) -> pd.DataFrame:
        """The table of ``kind`` (``patient``, ``observation`` or ``condition``), its rows in reading order."""
        return _table(self.rows.pop(kind, []), self.parsers[kind][0])
