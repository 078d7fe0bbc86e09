"""great-expectations 1.x suites for the ingested tables, and the rows each suite rejects.

Every table (patients, observations, conditions, notes, image series) gets an expectation suite
defined here, run once on an ephemeral context with a pandas data source. Each expectation carries
the quarantine reason it stands for in ``meta["reason"]``; results are requested with
``result_format="COMPLETE"`` and ``unexpected_index_column_names=["record_id"]`` so that exactly the
failing rows are quarantined. ``great_expectations`` is imported lazily (it takes seconds).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

RECORD_ID = "record_id"


@dataclass(frozen=True)
class Rule:
    """One expectation: its GX class name, keyword arguments and the quarantine reason on failure."""

    expectation: str
    kwargs: dict[str, Any]
    reason: str
    message: str


@dataclass
class TableValidation:
    """What one suite found: failing record ids with (reason, message), and the GX result JSON."""

    table: str
    success: bool
    failures: dict[str, tuple[str, str]] = field(default_factory=dict)
    result_json: dict[str, Any] = field(default_factory=dict)
    n_rows: int = 0
    expectations: list[dict[str, Any]] = field(default_factory=list)


def _json_safe(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return value


class TableValidator:
    """An ephemeral GX context that validates pandas tables against rule lists."""

    def __init__(self) -> None:
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        logging.getLogger("great_expectations").setLevel(logging.WARNING)

        self._gx = gx
        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)
        self.datasource = self.context.data_sources.add_pandas("meddiff_ingest")
        self._runs = 0

    def validate(self, table: str, frame: pd.DataFrame, rules: list[Rule]) -> TableValidation:
        """Run the suite of ``rules`` on ``frame`` (which must have a unique ``record_id`` column)."""
        if RECORD_ID not in frame.columns:
            raise ValueError(f"table {table!r} needs a {RECORD_ID!r} column to locate failing rows")
        if frame[RECORD_ID].duplicated().any():
            raise ValueError(f"table {table!r}: {RECORD_ID!r} must be unique")
        outcome = TableValidation(table=table, success=True, n_rows=len(frame))
        if frame.empty:
            return outcome
        gx = self._gx
        self._runs += 1
        name = f"{table}_{self._runs}"  # one validator may check the same table more than once
        suite = gx.ExpectationSuite(name=f"{name}_suite")
        for index, rule in enumerate(rules):
            expectation_class = getattr(gx.expectations, rule.expectation)
            suite.add_expectation(expectation_class(
                **rule.kwargs, meta={"reason": rule.reason, "message": rule.message, "rule_index": index}
            ))
        suite = self.context.suites.add(suite)
        asset = self.datasource.add_dataframe_asset(name=name)
        batch = asset.add_batch_definition_whole_dataframe(f"{name}_all").get_batch(
            batch_parameters={"dataframe": frame}
        )
        result = batch.validate(
            suite, result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [RECORD_ID]}
        )
        outcome.success = bool(result.success)
        outcome.result_json = result.to_json_dict()
        found: dict[str, tuple[int, str, str]] = {}
        for item in result.results:
            config = item.expectation_config
            meta = config.meta or {}
            column = config.kwargs.get("column")
            unexpected = item.result.get("unexpected_index_list") or []
            outcome.expectations.append({
                "expectation": config.type, "column": column, "success": bool(item.success),
                "unexpected_count": len(unexpected), "reason": meta.get("reason"),
            })
            if item.exception_info and item.exception_info.get("raised_exception"):
                raise RuntimeError(
                    f"great-expectations failed on table {table!r}, {config.type}({column}): "
                    f"{item.exception_info.get('exception_message')}"
                )
            for row in unexpected:
                record_id = str(row[RECORD_ID])
                value = _json_safe(row.get(column)) if column else None
                fields = {**config.kwargs, "column": column, "value": value}
                message = str(meta.get("message", config.type)).format(**fields)
                candidate = (int(meta.get("rule_index", len(rules))), str(meta.get("reason")), message)
                if record_id not in found or candidate[0] < found[record_id][0]:
                    found[record_id] = candidate  # the earliest rule in the suite names the reason
        outcome.failures = {record_id: (reason, message) for record_id, (_, reason, message) in found.items()}
        return outcome


def patient_rules(age_range: tuple[int, int]) -> list[Rule]:
    """FHIR R4 Patient: id present and unique, administrative gender coded, a readable and plausible age.

    Gender, birthDate and managingOrganization are optional (0..1) in R4: absent, they are unknown (the
    manifest's site is then ``unknown``). The id may hold ``_`` (BraTS 2021 case ids, ``BraTS2021_00001``)
    although a FHIR id may not: it is an identifier all the same and is pseudonymised like any other.
    """
    return [
        Rule("ExpectColumnValuesToNotBeNull", {"column": "patient_id"}, "missing_field",
             "Patient.id is missing"),
        Rule("ExpectColumnValuesToMatchRegex", {"column": "patient_id", "regex": r"^[A-Za-z0-9\-\._]{1,64}$"},
             "invalid_id", "Patient.id {value!r} is not an id ([A-Za-z0-9-._]{{1,64}})"),
        Rule("ExpectColumnValuesToNotMatchRegex", {"column": "patient_id", "regex": r"\.\."}, "invalid_id",
             "Patient.id {value!r} contains '..' (a path trick)"),
        Rule("ExpectColumnValuesToBeUnique", {"column": "patient_id"}, "duplicate_id",
             "Patient.id {value} appears in more than one (differing) Patient resource"),
        Rule("ExpectColumnValuesToBeInSet",
             {"column": "sex", "value_set": ["male", "female", "other", "unknown"]}, "invalid_code",
             "Patient.gender {value!r} is not in the FHIR AdministrativeGender value set"),
        Rule("ExpectColumnValuesToBeNull", {"column": "birth_date_invalid"}, "invalid_value",
             "Patient.birthDate {value!r} is not a FHIR date (YYYY, YYYY-MM or YYYY-MM-DD)"),
        Rule("ExpectColumnValuesToBeBetween",
             {"column": "age", "min_value": age_range[0], "max_value": age_range[1]}, "out_of_range",
             "age {value} years (from Patient.birthDate) is outside [{min_value}, {max_value}]"),
    ]


def observation_rules(lab_ranges: dict[str, tuple[float, float]], lab_units: dict[str, str]) -> list[Rule]:
    """FHIR R4 Observation: known LOINC code, convertible UCUM unit, unique id, value in range.

    The table has one column per canonical lab holding the harmonised value of that lab's rows only
    (NaN elsewhere; GX skips nulls in ``ExpectColumnValuesToBeBetween``).
    """
    rules = [
        Rule("ExpectColumnValuesToNotBeNull", {"column": "patient_id"}, "missing_field",
             "Observation.subject is missing"),
        Rule("ExpectColumnValuesToNotBeNull", {"column": "lab"}, "unknown_code",
             "Observation.code is not one of the mapped LOINC codes"),
        Rule("ExpectColumnValuesToNotBeNull", {"column": "raw_value"}, "missing_field",
             "Observation.valueQuantity.value is missing or not a number"),
        Rule("ExpectColumnValuesToNotBeNull", {"column": "value"}, "unknown_unit",
             "Observation.valueQuantity unit cannot be converted to the canonical UCUM unit"),
        Rule("ExpectColumnValuesToBeUnique", {"column": "observation_id"}, "duplicate_id",
             "Observation.id {value} is not unique"),
    ]
    for lab, (low, high) in lab_ranges.items():
        rules.append(Rule(
            "ExpectColumnValuesToBeBetween", {"column": lab, "min_value": low, "max_value": high},
            "out_of_range", f"{lab} = {{value}} {lab_units[lab]} is outside [{{min_value}}, {{max_value}}]",
        ))
    return rules


def condition_rules(class_names: list[str]) -> list[Rule]:
    """FHIR R4 Condition: a subject and an ICD-10 code that maps onto a diagnosis class."""
    return [
        Rule("ExpectColumnValuesToNotBeNull", {"column": "patient_id"}, "missing_field",
             "Condition.subject is missing"),
        Rule("ExpectColumnValuesToNotBeNull", {"column": "label"}, "unknown_code",
             "Condition.code is not mapped to a diagnosis class by dataset.classes"),
        Rule("ExpectColumnValuesToBeInSet", {"column": "label", "value_set": class_names}, "unknown_code",
             "diagnosis {value!r} is not one of dataset.classes"),
    ]


def note_rules(min_chars: int) -> list[Rule]:
    """Free-text notes: valid UTF-8 and at least ``min_chars`` characters."""
    return [
        Rule("ExpectColumnValuesToBeInSet", {"column": "utf8_valid", "value_set": [True]}, "not_utf8",
             "note is not valid UTF-8"),
        Rule("ExpectColumnValueLengthsToBeBetween", {"column": "text", "min_value": min_chars},
             "note_too_short", "note has fewer than {min_value} characters"),
    ]


def series_rules() -> list[Rule]:
    """Assembled CT series: one per patient, enough slices, intensities that are Hounsfield units."""
    return [
        Rule("ExpectColumnValuesToNotBeNull", {"column": "patient_id"}, "missing_field",
             "the series has no PatientID (0010,0020)"),
        Rule("ExpectColumnValuesToBeUnique", {"column": "patient_id"}, "multiple_series",
             "patient {value} has more than one CT series (one image per patient is supported)"),
        Rule("ExpectColumnValuesToBeBetween", {"column": "n_slices", "min_value": 2}, "too_few_slices",
             "the series has {value} slices"),
        Rule("ExpectColumnValuesToBeBetween", {"column": "hu_min", "min_value": -2048.0}, "implausible_hu",
             "minimum {value} is below any CT number (rescale wrong?)"),
        Rule("ExpectColumnValuesToBeBetween", {"column": "hu_max", "max_value": 4000.0}, "implausible_hu",
             "maximum {value} is above any CT number in a head (rescale wrong?)"),
    ]
