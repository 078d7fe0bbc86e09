"""De-identification of everything ``ingest`` writes to ``data/interim/``.

* **Key.** Patient ids, UIDs and date shifts come from a keyed hash, HMAC-SHA256 (RFC 2104) with a
  secret read from the environment variable ``ingest.deid_key_env`` (``MEDDIFF_DEID_KEY``); it is never
  in code or params. Without it ingest stops with :class:`DeidKeyError` -- except for a raw drop written
  by ``meddiff cohort`` (synthetic data) when ``ingest.allow_ephemeral_key_for_synthetic`` is true: the
  key is then derived from that drop's ``cohort.json``, so ``dvc repro`` is reproducible without secrets.
  That derived key is public (anyone with the drop can recompute it): it is for synthetic data only.
* **DICOM headers** (:func:`deidentify_dataset`): DICOM PS3.15 Annex E, Basic Application Level
  Confidentiality Profile (E.1.1, code 113100) with the Retain Longitudinal Temporal Information with
  Modified Dates Option (E.3.6, code 113107): private tags removed; every person name (VR PN) emptied
  and PatientName replaced by the pseudonym; PatientID -> pseudonym; identifying attributes of Table
  E.1-1 removed (X) or emptied (Z); every UID that is not a registered DICOM UID replaced by
  ``2.25.<HMAC>`` (consistently: the same UID maps to the same replacement across files); dates
  (VR DA/DT) shifted back by a per-patient keyed number of days, PatientBirthDate emptied, times (VR TM)
  emptied; PatientIdentityRemoved = YES, DeidentificationMethod (+ code sequence) added.
* **FHIR / CSV**: only derived, non-identifying fields reach the manifest (age in whole years, capped
  at ``ingest.deid_max_age``; sex; site code; labs; diagnosis) -- names, addresses, telecom, birth dates
  and identifiers are never copied.
* **Notes** (:func:`deidentify_text`): the patient's own identifiers, known from the Patient resource
  (names, id, identifiers, address parts, phone), are replaced by ``[NAME]``/``[ID]``/``[ADDRESS]``/
  ``[PHONE]``; then patterns: dates -> ``[DATE]``, phone numbers, e-mail addresses, ``Dr. <Name>``,
  ``MRN ...``, street addresses, ages over 89 -> ``90+``.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meddiff.errors import UserError

MIN_KEY_CHARS = 16
EPHEMERAL_KEY_LABEL = b"meddiff ephemeral de-identification key for synthetic data\x00"
COHORT_GENERATOR = "meddiff.data.cohort"
#: DeidentificationMethod (0012,0063), LO: each value at most 64 characters
DEID_METHOD_VALUES: tuple[str, ...] = (
    "PS3.15 Annex E Basic Application Confidentiality Profile",
    "meddiff HMAC-SHA256 pseudonyms and UIDs",
    "dates shifted per patient, times removed",
)
DEID_METHOD = "; ".join(DEID_METHOD_VALUES)


class DeidKeyError(UserError, RuntimeError):
    """No usable de-identification key: the message says how to provide one."""


def resolve_key(env_var: str, allow_ephemeral_for_synthetic: bool, raw_dir: Path) -> tuple[bytes, str]:
    """The HMAC key and where it came from (for the log; never the key itself)."""
    value = os.environ.get(env_var, "")
    if value:
        if len(value) < MIN_KEY_CHARS:
            raise DeidKeyError(f"{env_var} is set but shorter than {MIN_KEY_CHARS} characters; use a long "
                               f"random secret, e.g. `export {env_var}=$(openssl rand -hex 32)`")
        return value.encode(), f"environment variable {env_var}"
    provenance = Path(raw_dir) / "cohort.json"
    if allow_ephemeral_for_synthetic and provenance.is_file():
        content = provenance.read_bytes()
        try:
            generator = json.loads(content).get("generator")
        except (json.JSONDecodeError, AttributeError):
            generator = None
        if generator == COHORT_GENERATOR:
            return (hashlib.sha256(EPHEMERAL_KEY_LABEL + content).digest(),
                    f"derived from {provenance} (synthetic cohort; not a secret)")
    hint = (
        f"ingest.allow_ephemeral_key_for_synthetic is true but {provenance} is not a `meddiff cohort` "
        "provenance file" if allow_ephemeral_for_synthetic
        else "ingest.allow_ephemeral_key_for_synthetic is false"
    )
    raise DeidKeyError(
        f"de-identification key missing: set the environment variable {env_var} (ingest.deid_key_env) to a "
        f"secret of at least {MIN_KEY_CHARS} characters, e.g. `export {env_var}=$(openssl rand -hex 32)`, "
        f"and keep it out of the repository. Patient ids are pseudonymised with HMAC-SHA256 under this key. "
        f"({hint})"
    )


@dataclass(frozen=True)
class Pseudonymizer:
    """Keyed, deterministic replacements: pseudonyms, UIDs, date shifts (HMAC-SHA256)."""

    key: bytes = field(repr=False)
    max_date_shift_days: int = 365

    def _mac(self, domain: str, value: str) -> bytes:
        return hmac.new(self.key, f"{domain}\x00{value}".encode(), hashlib.sha256).digest()

    def pseudonym(self, patient_id: str) -> str:
        """``anon-`` + 20 hex digits (80 bits) of HMAC(patient id)."""
        return "anon-" + self._mac("patient", str(patient_id)).hex()[:20]

    def uid(self, uid: str) -> str:
        """A replacement UID under the ``2.25`` root (PS3.5 B.2): 128 bits of HMAC(uid) as an integer."""
        return "2.25." + str(int.from_bytes(self._mac("uid", str(uid))[:16], "big"))

    def date_shift_days(self, patient_id: str) -> int:
        """1 .. max_date_shift_days, fixed per patient (keeps intervals within a patient)."""
        return 1 + int.from_bytes(self._mac("date", str(patient_id))[:4], "big") % self.max_date_shift_days


def cap_age(age: float | None, max_age: int) -> float | None:
    """Ages above ``max_age`` reported as ``max_age`` (HIPAA Safe Harbor: ages over 89 aggregated)."""
    if age is None or age != age:  # NaN stays NaN
        return age
    return float(min(age, max_age))


# ------------------------------------------------------------------------------------------ DICOM

#: PS3.15 Table E.1-1 attributes removed (action X) -- those that occur in CT/MR/NM headers
REMOVE_KEYWORDS: frozenset[str] = frozenset({
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "InstitutionCodeSequence",
    "StationName", "DeviceSerialNumber", "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames",
    "PatientBirthName", "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers",
    "PatientAge", "PatientSize", "PatientWeight", "MilitaryRank", "BranchOfService", "EthnicGroup",
    "Occupation", "AdditionalPatientHistory", "PatientComments", "MedicalRecordLocator",
    "IssuerOfPatientID", "PatientInsurancePlanCodeSequence", "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers", "ReferringPhysicianIdentificationSequence",
    "PhysiciansOfRecordIdentificationSequence", "PerformingPhysicianIdentificationSequence",
    "StudyDescription", "SeriesDescription", "ImageComments", "RequestAttributesSequence",
    "PerformedProcedureStepDescription", "PerformedProcedureStepID", "ScheduledProcedureStepDescription",
    "AdmittingDiagnosesDescription", "AdmissionID", "DerivationDescription", "FrameComments",
    "ProtocolName", "ReasonForStudy", "RequestedProcedureDescription", "CountryOfResidence",
    "RegionOfResidence", "CurrentPatientLocation", "PatientInstitutionResidence", "PatientState",
    "ResponsibleOrganization", "StudyComments", "InterpretationText", "TextComments", "OperatorsName",
    "IdentifyingComments", "ContentCreatorName", "PatientBirthTime",
})
#: Table E.1-1 attributes replaced by a zero-length value (action Z) -- type 2 in most IODs
EMPTY_KEYWORDS: frozenset[str] = frozenset({
    "AccessionNumber", "StudyID", "PatientBirthDate", "PatientSex", "ReferringPhysicianName",
})
#: UIDs that identify a standard (registered) thing, never an instance: always kept
_KEEP_UID_KEYWORDS: frozenset[str] = frozenset({
    "SOPClassUID", "MediaStorageSOPClassUID", "TransferSyntaxUID", "ReferencedSOPClassUID",
    "ImplementationClassUID", "CodingSchemeUID", "ContextGroupExtensionCreatorUID",
})


def _shift_date(value: str, days: int) -> str:
    try:
        shifted = datetime.datetime.strptime(value.strip()[:8], "%Y%m%d").date() - datetime.timedelta(days=days)
    except ValueError:
        return ""
    return shifted.strftime("%Y%m%d")


def _registered_uid(value: str) -> bool:
    from pydicom.uid import UID

    return UID(value).name != value  # known to pydicom's UID dictionary: a SOP class, transfer syntax...


def _deidentify_elements(dataset: Any, pseudo: Pseudonymizer, patient_id: str, shift: int) -> None:
    for element in list(dataset):
        keyword = element.keyword
        if element.tag.group in range(0x5000, 0x5100, 2) or keyword in REMOVE_KEYWORDS:
            del dataset[element.tag]  # curves (50xx) and Table E.1-1 "X"
            continue
        if keyword in EMPTY_KEYWORDS:
            element.value = ""
        elif element.VR == "SQ":
            for item in element.value:
                _deidentify_elements(item, pseudo, patient_id, shift)
        elif element.VR == "PN":
            element.value = ""
        elif element.VR == "UI" and keyword not in _KEEP_UID_KEYWORDS and element.value:
            values = element.value if element.VM > 1 else [element.value]
            replaced = [str(v) if _registered_uid(str(v)) else pseudo.uid(str(v)) for v in values]
            element.value = replaced if element.VM > 1 else replaced[0]
        elif element.VR == "DA" and element.value:
            values = element.value if element.VM > 1 else [element.value]
            shifted = [_shift_date(str(v), shift) for v in values]
            element.value = shifted if element.VM > 1 else shifted[0]
        elif element.VR == "DT" and element.value:
            element.value = _shift_date(str(element.value), shift)
        elif element.VR == "TM":
            element.value = ""


def deidentify_dataset(dataset: Any, pseudo: Pseudonymizer, patient_id: str) -> Any:
    """Apply the Basic Application Level Confidentiality Profile (PS3.15 E.1.1) to ``dataset`` in place.

    ``patient_id`` is the original PatientID (the pseudonym and date shift are derived from it).
    """
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    dataset.remove_private_tags()
    shift = pseudo.date_shift_days(patient_id)
    _deidentify_elements(dataset, pseudo, patient_id, shift)
    file_meta = getattr(dataset, "file_meta", None)
    if file_meta is not None and "MediaStorageSOPInstanceUID" in file_meta:
        file_meta.MediaStorageSOPInstanceUID = pseudo.uid(str(file_meta.MediaStorageSOPInstanceUID))
    pseudonym = pseudo.pseudonym(patient_id)
    dataset.PatientID = pseudonym
    dataset.PatientName = pseudonym
    dataset.PatientIdentityRemoved = "YES"
    dataset.DeidentificationMethod = list(DEID_METHOD_VALUES)
    dataset.LongitudinalTemporalInformationModified = "MODIFIED"
    codes = []
    for value, meaning in (("113100", "Basic Application Confidentiality Profile"),
                           ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")):
        code = Dataset()
        code.CodeValue = value
        code.CodingSchemeDesignator = "DCM"
        code.CodeMeaning = meaning
        codes.append(code)
    dataset.DeidentificationMethodCodeSequence = Sequence(codes)
    return dataset


# ------------------------------------------------------------------------------------------- text


@dataclass(frozen=True)
class PatientIdentifiers:
    """What is known to identify one patient (from FHIR Patient / CSV / DICOM), for scrubbing notes."""

    patient_id: str
    names: tuple[str, ...] = ()
    identifiers: tuple[str, ...] = ()
    address: tuple[str, ...] = ()
    phones: tuple[str, ...] = ()
    birth_date: str | None = None

    def merged(self, other: PatientIdentifiers) -> PatientIdentifiers:
        return PatientIdentifiers(
            self.patient_id, tuple(dict.fromkeys(self.names + other.names)),
            tuple(dict.fromkeys(self.identifiers + other.identifiers)),
            tuple(dict.fromkeys(self.address + other.address)), tuple(dict.fromkeys(self.phones + other.phones)),
            self.birth_date or other.birth_date,
        )


def identifiers_from_patient(resource: dict[str, Any]) -> PatientIdentifiers:
    """Names, identifiers, address parts, phones and birth date of a FHIR R4 Patient."""
    names: list[str] = []
    for name in resource.get("name") or []:
        if not isinstance(name, dict):
            continue
        for part in [*(name.get("given") or []), name.get("family"), name.get("text")]:
            if isinstance(part, str) and part.strip():
                names.append(part.strip())
    address: list[str] = []
    for entry in resource.get("address") or []:
        if not isinstance(entry, dict):
            continue
        for part in [*(entry.get("line") or []), entry.get("city"), entry.get("postalCode"), entry.get("text")]:
            if isinstance(part, str) and part.strip():
                address.append(part.strip())
    identifiers = [str(i.get("value")) for i in resource.get("identifier") or []
                   if isinstance(i, dict) and i.get("value")]
    phones = [str(t.get("value")) for t in resource.get("telecom") or [] if isinstance(t, dict) and t.get("value")]
    return PatientIdentifiers(str(resource.get("id", "")), tuple(names), tuple(identifiers), tuple(address),
                              tuple(phones), resource.get("birthDate"))


_MONTHS = (r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|jun(?:e)?|jul(?:y)?|aug(?:ust)?|"
           r"sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)")
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+")
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\b\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2})?(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2})?)?\b"), "[DATE]"),
    (re.compile(r"\b\d{1,2}[/.]\d{1,2}[/.]\d{2,4}\b"), "[DATE]"),
    (re.compile(rf"\b{_MONTHS}\.? \d{{1,2}}(?:st|nd|rd|th)?,? \d{{4}}\b", re.IGNORECASE), "[DATE]"),
    (re.compile(rf"\b\d{{1,2}} {_MONTHS}\.? \d{{4}}\b", re.IGNORECASE), "[DATE]"),
    (re.compile(r"\b(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\b"), "[DATE]"),
    (re.compile(r"(?:\+?1[ .-]?)?\(?\b\d{3}\)?[ .-]\d{3}[ .-]\d{4}\b"), "[PHONE]"),
    (re.compile(r"\b(?:MRN|MR#|Acc(?:ession)?\.?(?: ?(?:no|#))?)[:#]?\s*[A-Z0-9-]{4,}\b", re.IGNORECASE), "[ID]"),
    (re.compile(r"\b(Dr\.?|Doctor|Prof\.?)\s+[A-Z][a-zA-Z'-]+(?:\s+[A-Z][a-zA-Z'-]+)?"), r"\1 [NAME]"),
    (re.compile(r"\b\d{1,5}\s+(?:[A-Z][a-z]+\s){1,3}(?:St|Street|Ave|Avenue|Rd|Road|Blvd|Boulevard|Ln|Lane|"
                r"Dr|Drive|Way|Ct|Court|Pl|Place|Terrace)\b\.?"), "[ADDRESS]"),
    (re.compile(r"\b(?:9\d|1\d\d)(\s?(?:yo|y/o|y\.o\.|-year-old| year old| years old))", re.IGNORECASE), r"90+\1"),
)


def _literal(values: Iterable[str], min_chars: int = 2) -> re.Pattern[str] | None:
    parts = sorted({v for v in values if len(v) >= min_chars}, key=len, reverse=True)
    if not parts:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(re.escape(p) for p in parts) + r")(?!\w)", re.IGNORECASE)


def deidentify_text(text: str, who: PatientIdentifiers | None = None) -> str:
    """Scrub a free-text note: e-mail addresses, the patient's known identifiers, then generic patterns."""
    text = _EMAIL.sub("[EMAIL]", text)
    if who is not None:
        for values, tag in ((who.phones, "[PHONE]"), (who.address, "[ADDRESS]"),
                            ((who.patient_id, *who.identifiers), "[ID]"), (who.names, "[NAME]")):
            pattern = _literal(values)
            if pattern is not None:
                text = pattern.sub(tag, text)
        if who.birth_date:
            text = text.replace(str(who.birth_date), "[DATE]")
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text
