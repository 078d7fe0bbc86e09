"""Read FHIR R4 bulk-data NDJSON and Bundles (Patient, Observation, Condition, DocumentReference).

* Patient (https://hl7.org/fhir/R4/patient.html): ``id``, ``gender``, ``birthDate`` → age at the
  reference date, ``managingOrganization`` → acquisition site. Every field but ``id`` is optional (0..1):
  an absent one is unknown, not an error. A partial ``birthDate`` (``1957``, ``1957-07``, datatypes
  2.24.0.4 ``date``) is dated to the middle of its period (1 July, the 15th) for the age.
* Observation (https://hl7.org/fhir/R4/observation.html): ``code.coding`` LOINC → canonical lab,
  ``valueQuantity`` harmonised to the canonical UCUM unit (https://ucum.org). A panel without a
  top-level value (the vital-signs blood pressure panel 85354-9) is read from the first ``component``
  whose code is a mapped lab (systolic 8480-6), as the vital-signs profile puts it.
* Condition (https://hl7.org/fhir/R4/condition.html): ``code.coding`` ICD-10 → diagnosis class, with or
  without the dot (``I639`` = ``I63.9``, as claims extracts write it).
* DocumentReference (https://hl7.org/fhir/R4/documentreference.html): a note as an inline base64
  ``content[].attachment.data`` of contentType ``text/plain``.
* Bundle (https://hl7.org/fhir/R4/bundle.html): a JSON document whose ``entry[].resource`` are read
  like NDJSON lines; in transaction/collection Bundles, references to an entry's ``fullUrl``
  (``urn:uuid:...``, absolute URLs) are resolved to ``Type/id`` and an entry without ``id`` takes the
  id its ``fullUrl`` ends with (Bundle 3.3.1 "Resolving references in Bundles").
* References may be relative (``Patient/P1``), absolute (``https://server/fhir/Patient/P1``) or
  versioned (``Patient/P1/_history/2``).

Parsing never raises on a bad line or an unexpected JSON shape: it returns the row with the problem
recorded, and validation (great-expectations) decides what is quarantined.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOINC_SYSTEM = "http://loinc.org"
#: ICD-10 code systems: WHO and national modifications, by URI and by OID (HL7 terminology)
ICD10_SYSTEMS = ("http://hl7.org/fhir/sid/icd-10", "http://hl7.org/fhir/sid/icd-10-cm",
                 "http://hl7.org/fhir/sid/icd-10-gm", "http://hl7.org/fhir/sid/icd-10-ca",
                 "http://hl7.org/fhir/sid/icd-10-am", "http://hl7.org/fhir/sid/icd-10-uk",
                 "urn:oid:2.16.840.1.113883.6.3", "urn:oid:2.16.840.1.113883.6.90")
#: a FHIR date (datatypes 2.24.0.4): year, year-month or full date; a dateTime's date part is accepted
FHIR_DATE = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?(?:T.*)?")
#: a partial date is dated to the middle of its period: 1 July of a year, the 15th of a month
MID_YEAR_MONTH, MID_MONTH_DAY = 7, 15
#: the id at the end of a reference: ``Type/id``, optionally after a base URL and before ``/_history/v``
_REFERENCE = re.compile(r"(?:.*/)?([A-Za-z]+)/([^/]+?)(?:/_history/[^/]+)?")
#: UCUM units as servers and spreadsheets often write them (display strings) -> the UCUM code
UNIT_ALIASES: dict[str, str] = {"K/uL": "10*3/uL", "k/uL": "10*3/uL", "x10E3/uL": "10*3/uL", "#/uL": "/uL",
                                "mg/dL": "mg/dL", "mg/L": "mg/L", "mmol/L": "mmol/L", "mm Hg": "mm[Hg]",
                                "mmHg": "mm[Hg]", "°C": "Cel", "°F": "[degF]", "degC": "Cel", "degF": "[degF]"}

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


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def reference_id(reference: Any, resource_type: str = "Patient") -> str | None:
    """``{"reference": "Patient/P1"}`` -> ``"P1"`` (also absolute and ``_history`` forms); else ``None``."""
    value = _dict(reference).get("reference")
    if not isinstance(value, str):
        return None
    match = _REFERENCE.fullmatch(value.strip())
    return match.group(2) if match and match.group(1) == resource_type else None


def parse_fhir_date(value: Any) -> datetime.date | None:
    """A FHIR ``date`` (``YYYY``, ``YYYY-MM``, ``YYYY-MM-DD``) or a dateTime's date; partial dates dated to
    the middle of their period (:data:`MID_YEAR_MONTH`, :data:`MID_MONTH_DAY`). ``None`` if not a date."""
    if not isinstance(value, str):
        return None
    match = FHIR_DATE.fullmatch(value.strip())
    if match is None:
        return None
    year, month, day = match.groups()
    try:
        return datetime.date(int(year), int(month or MID_YEAR_MONTH), int(day or (MID_MONTH_DAY if month else 1)))
    except ValueError:
        return None


def age_at(birth_date: str | None, reference_date: datetime.date) -> float | None:
    """Completed years between ``birth_date`` (FHIR date, partial allowed) and ``reference_date``."""
    born = parse_fhir_date(birth_date)
    if born is None:
        return None
    years = reference_date.year - born.year - ((reference_date.month, reference_date.day) < (born.month, born.day))
    return float(years)


def _site(organisation: Any) -> str | None:
    """The acquisition site of ``managingOrganization``: the Organization id, else its identifier value."""
    site = reference_id(organisation, "Organization")
    if site is None:
        identifier = _dict(_dict(organisation).get("identifier")).get("value")
        site = identifier if isinstance(identifier, str) and identifier.strip() else None
    return site


def patient_row(resource: dict[str, Any], reference_date: datetime.date) -> dict[str, Any]:
    """Flatten a Patient: id, sex (FHIR gender), birth date, age, site (``None`` when absent).

    ``birth_date_invalid`` holds a ``birthDate`` that is present but not a FHIR date (quarantined).
    """
    birth_date = resource.get("birthDate")
    age = age_at(birth_date, reference_date)
    return {
        "patient_id": resource.get("id") if isinstance(resource.get("id"), str) else None,
        "sex": resource.get("gender"),
        "birth_date": birth_date,
        "birth_date_invalid": str(birth_date) if birth_date not in (None, "") and age is None else None,
        "age": age,
        "site": _site(resource.get("managingOrganization")),
    }


def harmonise(lab: str, value: float, unit: str, canonical_unit: str) -> float | None:
    """``value`` in ``unit`` converted to ``canonical_unit``; None when no conversion is known."""
    unit = UNIT_ALIASES.get(unit.strip(), unit.strip())
    if unit == canonical_unit:
        return value
    convert = UNIT_CONVERSIONS.get((unit, canonical_unit))
    required_lab = LAB_SPECIFIC.get((unit, canonical_unit))
    if convert is None or (required_lab is not None and required_lab != lab):
        return None
    return convert(value)


def _loinc(concept: Any) -> str | None:
    codings = _list(_dict(concept).get("coding"))
    return next((str(c.get("code")) for c in codings if isinstance(c, dict) and c.get("system") == LOINC_SYSTEM
                 and c.get("code") is not None), None)


def _number(value: Any) -> float | None:
    """A JSON number; a numeric string (as some servers write decimals) read leniently; else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def observation_row(
    resource: dict[str, Any], lab_by_loinc: dict[str, str], lab_units: dict[str, str]
) -> dict[str, Any]:
    """Flatten an Observation: LOINC -> canonical lab, valueQuantity -> value in the canonical unit.

    The top-level code and value come first; an Observation whose top-level code is not a mapped lab
    (a panel such as blood pressure 85354-9) is read from its first component with a mapped LOINC code.
    """
    loinc = _loinc(resource.get("code"))
    lab = lab_by_loinc.get(loinc) if loinc is not None else None
    quantity = _dict(resource.get("valueQuantity"))
    if lab is None:
        for component in _list(resource.get("component")):
            code = _loinc(_dict(component).get("code"))
            if code is not None and code in lab_by_loinc:
                loinc, lab, quantity = code, lab_by_loinc[code], _dict(component.get("valueQuantity"))
                break
    unit = quantity.get("code") or quantity.get("unit")
    unit = unit if isinstance(unit, str) else None
    raw_value = _number(quantity.get("value"))
    value = None
    if lab is not None and raw_value is not None and unit is not None:
        value = harmonise(lab, raw_value, unit, lab_units[lab])
    return {
        "observation_id": resource.get("id"),
        "patient_id": reference_id(resource.get("subject")),
        "loinc": loinc,
        "lab": lab,
        "raw_value": raw_value,
        "unit": unit,
        "value": value,
    }


def icd10_dotted(code: str) -> str:
    """An ICD-10 code in its dotted form: ``I639`` -> ``I63.9`` (claims extracts and MIMIC drop the dot)."""
    code = code.strip().upper()
    return f"{code[:3]}.{code[3:]}" if len(code) > 3 and "." not in code else code


def icd10_class(code: str | None, icd10_to_class: dict[str, str]) -> str | None:
    """The class of an ICD-10 code: exact match, else the longest matching prefix (dots ignored, so
    ``I639``, ``I63.9`` and ``i63.9`` are one code)."""
    if not code:
        return None
    bare = code.replace(".", "").strip().upper()
    for prefix in sorted(icd10_to_class, key=len, reverse=True):
        if bare.startswith(prefix.replace(".", "").strip().upper()):
            return icd10_to_class[prefix]
    return None


def condition_row(resource: dict[str, Any], icd10_to_class: dict[str, str]) -> dict[str, Any]:
    """Flatten a Condition: ICD-10 code (dotted) -> diagnosis label."""
    codings = _list(_dict(resource.get("code")).get("coding"))
    code = next((c.get("code") for c in codings if isinstance(c, dict) and c.get("system") in ICD10_SYSTEMS
                 and isinstance(c.get("code"), str)), None)
    return {
        "condition_id": resource.get("id"),
        "patient_id": reference_id(resource.get("subject")),
        "icd10": icd10_dotted(code) if code else None,
        "label": icd10_class(code, icd10_to_class),
    }


def _id_from_full_url(full_url: str) -> tuple[str | None, str]:
    """``(resource type or None, id)`` an entry's fullUrl names: ``urn:uuid:<id>``, ``.../Type/<id>``."""
    for prefix in ("urn:uuid:", "urn:oid:"):
        if full_url.startswith(prefix):
            return None, full_url[len(prefix):]
    match = _REFERENCE.fullmatch(full_url)
    return (match.group(1), match.group(2)) if match else (None, full_url.rsplit("/", 1)[-1])


def _resolve_references(value: Any, targets: dict[str, str]) -> Any:
    """``value`` with every ``{"reference": <fullUrl of an entry>}`` rewritten to ``Type/id``."""
    if isinstance(value, dict):
        out = {k: _resolve_references(v, targets) for k, v in value.items()}
        reference = out.get("reference")
        if isinstance(reference, str) and reference in targets:
            out["reference"] = targets[reference]
        return out
    if isinstance(value, list):
        return [_resolve_references(v, targets) for v in value]
    return value


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
    raw_entries = _list(bundle.get("entry"))
    targets: dict[str, str] = {}  # fullUrl -> Type/id (Bundle 3.3.1)
    for entry in raw_entries:
        resource, full_url = _dict(_dict(entry).get("resource")), _dict(entry).get("fullUrl")
        if isinstance(full_url, str) and isinstance(resource.get("resourceType"), str):
            own_id = resource.get("id") if isinstance(resource.get("id"), str) else _id_from_full_url(full_url)[1]
            targets[full_url] = f"{resource['resourceType']}/{own_id}"
    entries: list[tuple[int, dict[str, Any] | None, str | None]] = []
    for index, entry in enumerate(raw_entries):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            entries.append((index, None, "Bundle.entry without a resource object"))
            continue
        full_url = entry.get("fullUrl")
        if targets:
            resource = _resolve_references(resource, targets)
        if not isinstance(resource.get("id"), str) and isinstance(full_url, str) and full_url in targets:
            resource = {**resource, "id": targets[full_url].split("/", 1)[1]}
        entries.append((index, resource, None))
    return entries, None


def document_note(resource: dict[str, Any]) -> tuple[str | None, bytes | None, str | None]:
    """``(patient id, note bytes, problem)`` of a DocumentReference with an inline text/plain attachment.

    ``problem`` is ``(reason: message)`` text when there is no readable attachment.
    """
    patient_id = reference_id(resource.get("subject"))
    for content in _list(resource.get("content")):
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
