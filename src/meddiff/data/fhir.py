"""Read FHIR R4 bulk-data NDJSON and Bundles (Patient, Observation, Condition, DocumentReference).

* Patient (https://hl7.org/fhir/R4/patient.html): ``id``, ``gender``, ``birthDate`` → age at the
  reference date, ``managingOrganization`` → acquisition site.
* Observation (https://hl7.org/fhir/R4/observation.html): ``code.coding`` LOINC → canonical lab,
  ``valueQuantity`` harmonised to the canonical UCUM unit (https://ucum.org).
* Condition (https://hl7.org/fhir/R4/condition.html): ``code.coding`` ICD-10 → diagnosis class.
* DocumentReference (https://hl7.org/fhir/R4/documentreference.html): a note as an inline base64
  ``content[].attachment.data`` of contentType ``text/plain``.
* Bundle (https://hl7.org/fhir/R4/bundle.html): a JSON document whose ``entry[].resource`` are read
  like NDJSON lines.

Parsing never raises on a bad line: it returns the row with the problem recorded, and validation
(great-expectations) decides what is quarantined.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOINC_SYSTEM = "http://loinc.org"
ICD10_SYSTEMS = ("http://hl7.org/fhir/sid/icd-10", "http://hl7.org/fhir/sid/icd-10-cm")

#: UCUM conversions (from unit, to unit) -> function; lab-specific ones are keyed with the lab name
UNIT_CONVERSIONS: dict[tuple[str, str], Callable[[float], float]] = {
    ("mg/dL", "mmol/L"): lambda v: v / 18.016,  # glucose, molar mass 180.16 g/mol
    ("[degF]", "Cel"): lambda v: (v - 32.0) * 5.0 / 9.0,
    ("K", "Cel"): lambda v: v - 273.15,
    ("10*9/L", "10*3/uL"): lambda v: v,
    ("/nL", "10*3/uL"): lambda v: v,
    ("mg/dL", "mg/L"): lambda v: v * 10.0,
    ("kPa", "mm[Hg]"): lambda v: v * 7.50062,
    ("1", "{INR}"): lambda v: v,
}
#: conversions only valid for one lab (they depend on the analyte's molar mass)
LAB_SPECIFIC: dict[tuple[str, str], str] = {("mg/dL", "mmol/L"): "glucose"}


@dataclass(frozen=True)
class NdjsonLine:
    """One line of an NDJSON file: its number, text and parsed resource (or the parse error)."""

    line_number: int
    text: str
    resource: dict[str, Any] | None
    error: str | None


def read_ndjson(path: Path) -> Iterator[NdjsonLine]:
    """Stream the non-empty lines of an NDJSON file (FHIR bulk data export format)."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            text = line.strip()
            if not text:
                continue
            try:
                resource = json.loads(text)
            except json.JSONDecodeError as error:
                yield NdjsonLine(number, text, None, f"invalid JSON: {error}")
                continue
            if not isinstance(resource, dict):
                yield NdjsonLine(number, text, None, "a line must hold one JSON object")
                continue
            yield NdjsonLine(number, text, resource, None)


def reference_id(reference: Any, resource_type: str = "Patient") -> str | None:
    """``{"reference": "Patient/P1"}`` -> ``"P1"``."""
    if not isinstance(reference, dict):
        return None
    value = str(reference.get("reference", ""))
    prefix = f"{resource_type}/"
    return value[len(prefix):] if value.startswith(prefix) else None


def age_at(birth_date: str | None, reference_date: datetime.date) -> float | None:
    """Completed years between ``birth_date`` (FHIR date) and ``reference_date``."""
    if not birth_date:
        return None
    try:
        born = datetime.date.fromisoformat(str(birth_date)[:10])
    except ValueError:
        return None
    years = reference_date.year - born.year - ((reference_date.month, reference_date.day) < (born.month, born.day))
    return float(years)


def patient_row(resource: dict[str, Any], reference_date: datetime.date) -> dict[str, Any]:
    """Flatten a Patient: id, sex (FHIR gender), birth date, age, site."""
    organisation = reference_id(resource.get("managingOrganization"), "Organization")
    return {
        "patient_id": resource.get("id"),
        "sex": resource.get("gender"),
        "birth_date": resource.get("birthDate"),
        "age": age_at(resource.get("birthDate"), reference_date),
        "site": organisation,
    }


def harmonise(lab: str, value: float, unit: str, canonical_unit: str) -> float | None:
    """``value`` in ``unit`` converted to ``canonical_unit``; None when no conversion is known."""
    if unit == canonical_unit:
        return value
    convert = UNIT_CONVERSIONS.get((unit, canonical_unit))
    required_lab = LAB_SPECIFIC.get((unit, canonical_unit))
    if convert is None or (required_lab is not None and required_lab != lab):
        return None
    return convert(value)


def observation_row(
    resource: dict[str, Any], lab_by_loinc: dict[str, str], lab_units: dict[str, str]
) -> dict[str, Any]:
    """Flatten an Observation: LOINC -> canonical lab, valueQuantity -> value in the canonical unit."""
    codings = (resource.get("code") or {}).get("coding") or []
    loinc = next((c.get("code") for c in codings if c.get("system") == LOINC_SYSTEM), None)
    lab = lab_by_loinc.get(str(loinc)) if loinc is not None else None
    quantity = resource.get("valueQuantity") or {}
    unit = quantity.get("code") or quantity.get("unit")
    raw_value = quantity.get("value")
    raw_value = float(raw_value) if isinstance(raw_value, int | float) and not isinstance(raw_value, bool) else None
    value = None
    if lab is not None and raw_value is not None and unit is not None:
        value = harmonise(lab, raw_value, str(unit), lab_units[lab])
    return {
        "observation_id": resource.get("id"),
        "patient_id": reference_id(resource.get("subject")),
        "loinc": loinc,
        "lab": lab,
        "raw_value": raw_value,
        "unit": unit,
        "value": value,
    }


def icd10_class(code: str | None, icd10_to_class: dict[str, str]) -> str | None:
    """The class of an ICD-10 code: exact match, else the longest matching prefix."""
    if not code:
        return None
    for prefix in sorted(icd10_to_class, key=len, reverse=True):
        if code == prefix or code.startswith(prefix):
            return icd10_to_class[prefix]
    return None


def condition_row(resource: dict[str, Any], icd10_to_class: dict[str, str]) -> dict[str, Any]:
    """Flatten a Condition: ICD-10 code -> diagnosis label."""
    codings = (resource.get("code") or {}).get("coding") or []
    code = next((c.get("code") for c in codings if c.get("system") in ICD10_SYSTEMS), None)
    return {
        "condition_id": resource.get("id"),
        "patient_id": reference_id(resource.get("subject")),
        "icd10": code,
        "label": icd10_class(code, icd10_to_class),
    }


def read_bundle(path: Path) -> tuple[list[tuple[int, dict[str, Any] | None, str | None]], str | None]:
    """``(entries, error)`` of a Bundle file: ``(index, resource, problem)`` per entry, or a file error."""
    try:
        with open(path, encoding="utf-8") as handle:
            bundle = json.load(handle)
    except UnicodeDecodeError as error:
        return [], f"not UTF-8: {error}"
    except json.JSONDecodeError as error:
        return [], f"invalid JSON: {error}"
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        kind = bundle.get("resourceType") if isinstance(bundle, dict) else type(bundle).__name__
        return [], f"resourceType {kind!r}, expected a FHIR Bundle"
    entries = []
    for index, entry in enumerate(bundle.get("entry") or []):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            entries.append((index, None, "Bundle.entry without a resource object"))
        else:
            entries.append((index, resource, None))
    return entries, None


def document_note(resource: dict[str, Any]) -> tuple[str | None, bytes | None, str | None]:
    """``(patient id, note bytes, problem)`` of a DocumentReference with an inline text/plain attachment.

    ``problem`` is ``(reason: message)`` text when there is no readable attachment.
    """
    patient_id = reference_id(resource.get("subject"))
    for content in resource.get("content") or []:
        attachment = content.get("attachment") if isinstance(content, dict) else None
        if not isinstance(attachment, dict):
            continue
        content_type = str(attachment.get("contentType", "")).split(";")[0].strip().lower()
        if content_type != "text/plain":
            return patient_id, None, f"unsupported_format: attachment contentType {content_type!r}, expected text/plain"
        data = attachment.get("data")
        if not isinstance(data, str) or not data:
            return patient_id, None, "missing_field: attachment has no inline data (url attachments are not fetched)"
        try:
            return patient_id, base64.b64decode(data, validate=True), None
        except (binascii.Error, ValueError) as error:
            return patient_id, None, f"unreadable_attachment: attachment data is not base64: {error}"
    return patient_id, None, "missing_field: DocumentReference.content has no attachment"
