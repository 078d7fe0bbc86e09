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

import contextlib
import datetime
import hashlib
import hmac
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator
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

#: PS3.15 Table E.1-1 attributes removed (action X, or X/Z/D where removing is allowed), sequences included:
#: the nested ones that keep earlier values of identifying attributes (Original Attributes, Modified
#: Attributes), name persons (operators, performers, observers) or hold free text (Content Sequence)
REMOVE_KEYWORDS: frozenset[str] = frozenset("""
    AcquisitionComments AcquisitionContextSequence AcquisitionDeviceProcessingDescription ActualHumanPerformersSequence
    AdditionalPatientHistory AdmissionID AdmittingDate AdmittingDiagnosesCodeSequence AdmittingDiagnosesDescription
    AdmittingTime Allergies AuthorObserverSequence BranchOfService CassetteID CommentsOnThePerformedProcedureStep
    ConfidentialityConstraintOnPatientDataDescription ConsultingPhysicianIdentificationSequence
    ContentCreatorIdentificationCodeSequence ContentCreatorName ContentSequence ContributingEquipmentSequence
    CountryOfResidence CurrentPatientLocation CustodialOrganizationSequence DataSetTrailingPadding DerivationDescription
    DetectorID DeviceSerialNumber DigitalSignaturesSequence DischargeDiagnosisCodeSequence DischargeDiagnosisDescription
    EncryptedAttributesSequence EthnicGroup FillerOrderNumberImagingServiceRequest FillerOrderNumberProcedure
    FrameComments GantryID HumanPerformerName HumanPerformerOrganization IconImageSequence IdentifyingComments
    ImageComments ImagePresentationComments InstitutionAddress InstitutionCodeSequence InstitutionName
    InstitutionalDepartmentName InstitutionalDepartmentTypeCodeSequence InsurancePlanIdentification
    IntendedRecipientsOfResultsIdentificationSequence InterpretationApproverSequence InterpretationAuthor
    InterpretationDiagnosisDescription InterpretationRecorder InterpretationText InterpretationTranscriber
    IssuerOfAdmissionID IssuerOfAdmissionIDSequence IssuerOfPatientID IssuerOfPatientIDQualifiersSequence
    IssuerOfServiceEpisodeID MACParametersSequence MedicalAlerts MedicalRecordLocator MilitaryRank
    ModifiedAttributesSequence ModifyingDeviceID ModifyingDeviceManufacturer NameOfPhysiciansReadingStudy
    NamesOfIntendedRecipientsOfResults Occupation OperatorIdentificationSequence OperatorsName OrderCallbackPhoneNumber
    OrderCallbackTelecomInformation OrderEnteredBy OrderEntererLocation OriginalAttributesSequence OtherPatientIDs
    OtherPatientIDsSequence OtherPatientNames ParticipantSequence PatientAddress PatientAge PatientBirthName
    PatientBirthTime PatientComments PatientInstitutionResidence PatientInsurancePlanCodeSequence PatientMotherBirthName
    PatientPrimaryLanguageCodeSequence PatientPrimaryLanguageModifierCodeSequence PatientReligiousPreference
    PatientSexNeutered PatientSize PatientState PatientTelecomInformation PatientTelephoneNumbers
    PatientTransportArrangements PatientWeight PerformedLocation PerformedProcedureStepDescription
    PerformedProcedureStepID PerformedStationAETitle PerformedStationGeographicLocationCodeSequence PerformedStationName
    PerformedStationNameCodeSequence PerformingPhysicianIdentificationSequence PerformingPhysicianName PersonAddress
    PersonIdentificationCodeSequence PersonName PersonTelecomInformation PersonTelephoneNumbers
    PhysicianApprovingInterpretation PhysiciansOfRecord PhysiciansOfRecordIdentificationSequence
    PhysiciansReadingStudyIdentificationSequence PlacerOrderNumberImagingServiceRequest PlacerOrderNumberProcedure
    PlateID PreMedication PregnancyStatus ProtocolName ReasonForStudy ReasonForTheImagingServiceRequest
    ReferencedDigitalSignatureSequence ReferencedPatientAliasSequence ReferencedPatientPhotoSequence
    ReferencedPatientSequence ReferencedSOPInstanceMACSequence ReferringPhysicianAddress
    ReferringPhysicianIdentificationSequence ReferringPhysicianTelephoneNumbers RegionOfResidence
    RequestAttributesSequence RequestedContrastAgent RequestedProcedureComments RequestedProcedureDescription
    RequestedProcedureID RequestedProcedureLocation RequestingPhysician RequestingService RequestingServiceCodeSequence
    ResponsibleOrganization ResponsiblePerson ResultsComments ResultsDistributionListSequence ResultsIDIssuer
    ReviewerName ScheduledHumanPerformersSequence ScheduledPatientInstitutionResidence
    ScheduledPerformingPhysicianIdentificationSequence ScheduledPerformingPhysicianName
    ScheduledProcedureStepDescription ScheduledProcedureStepLocation ScheduledStationAETitle
    ScheduledStationGeographicLocationCodeSequence ScheduledStationName ScheduledStationNameCodeSequence
    SeriesDescription ServiceEpisodeDescription ServiceEpisodeID SmokingStatus SourceApplicationEntityTitle SpecialNeeds
    StationName StudyComments StudyDescription TextComments TextString TopicAuthor TopicKeywords TopicSubject TopicTitle
    VerifyingObserverIdentificationCodeSequence VerifyingObserverName VerifyingObserverSequence VerifyingOrganization
    VisitComments
""".split())  # noqa: SIM905 - a keyword table reads better as words
#: identifying attributes replaced at the top level only; a nested copy (an earlier value) is removed
TOP_LEVEL_ONLY_KEYWORDS: frozenset[str] = frozenset({"PatientID", "PatientName"})
#: value representations that hold free text, where a name may have been typed (PS3.5 6.2)
TEXT_VRS: frozenset[str] = frozenset({"LO", "SH", "ST", "LT", "UT", "UC", "PN"})
#: character sets tried on a person name's bytes, besides the declared one: what exporters write without
#: declaring it (UTF-8 first, as it is self-validating), then common single- and double-byte sets
NAME_ENCODINGS: tuple[str, ...] = ("utf-8", "latin-1", "cp1252", "cp1251", "iso8859-2", "iso8859-7", "gbk",
                                   "shift_jis", "euc_kr")
#: shortest name or id searched in the text elements a profiled header keeps (shorter ones match by chance)
MIN_IDENTIFIER_CHARS = 4
#: shortest word of a name scrubbed on its own (shorter ones only as part of the whole name)
MIN_NAME_WORD_CHARS = 3
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


def _deidentify_elements(dataset: Any, pseudo: Pseudonymizer, patient_id: str, shift: int, depth: int = 0) -> None:
    for element in list(dataset):
        keyword = element.keyword
        if (element.tag.group in range(0x5000, 0x5100, 2) or keyword in REMOVE_KEYWORDS
                or (depth > 0 and keyword in TOP_LEVEL_ONLY_KEYWORDS)):
            del dataset[element.tag]  # curves (50xx), Table E.1-1 "X", earlier copies of the patient's identity
            continue
        if keyword in EMPTY_KEYWORDS:
            element.value = ""
        elif element.VR == "SQ":
            for item in element.value:
                _deidentify_elements(item, pseudo, patient_id, shift, depth + 1)
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


def _decodings(raw: bytes) -> list[str]:
    """Every reading of ``raw`` in :data:`NAME_ENCODINGS` that decodes without error."""
    out = []
    for encoding in NAME_ENCODINGS:
        try:
            out.append(raw.decode(encoding))
        except UnicodeDecodeError:
            continue
    return out


def _name_words(text: str) -> list[str]:
    """A person name's parts (PS3.5 6.2.1: ``^`` between components, ``=`` between representations) and
    the words of each part long enough to scrub alone."""
    parts = [p.strip() for p in re.split(r"[\^=]", unicodedata.normalize("NFC", text)) if p.strip()]
    words = [w for p in parts for w in p.split() if len(w) >= MIN_NAME_WORD_CHARS and w != p]
    full = " ".join(parts)
    return list(dict.fromkeys([*parts, *words, *([full] if len(parts) > 1 else [])]))


def elements_with_vr(dataset: Any) -> Iterator[tuple[Any, Any, str]]:
    """``(tag, element, VR)`` of every top-level element of ``dataset``, read without decoding values.

    An element read without a VR (implicit VR files) or as UN takes the data dictionary's VR; private or
    unknown tags without one are skipped. Callers recurse into ``SQ`` items themselves.
    """
    from pydicom.datadict import dictionary_VR
    from pydicom.dataelem import RawDataElement

    for tag in list(dataset.keys()):
        element = dataset.get_item(tag)
        if element is None:
            continue
        vr = element.VR
        if vr is None or (isinstance(element, RawDataElement) and vr == "UN"):
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                continue
        yield tag, element, vr


def person_names(dataset: Any) -> tuple[str, ...]:
    """Every person name in a DICOM header (VR PN, nested sequences included), in every plausible reading.

    Names are often stored in a character set other than the declared (0008,0005) -- UTF-8 bytes with no
    declaration read as Latin-1 are garbage -- so the raw bytes are decoded in the declared set and in
    :data:`NAME_ENCODINGS` alike; each reading's components and words are returned (for the note scrubber).
    """
    names: list[str] = []
    for tag, element, vr in elements_with_vr(dataset):
        if vr == "SQ":
            for item in dataset[tag].value or []:
                names.extend(person_names(item))
            continue
        if vr != "PN":
            continue
        raw = element.value if isinstance(element.value, bytes) else None
        readings = _decodings(raw) if raw else []
        with contextlib.suppress(UnicodeError, ValueError, LookupError):  # the raw readings above stand in
            readings.append(str(dataset[tag].value or ""))
        for reading in readings:
            names.extend(_name_words(reading))
    return tuple(dict.fromkeys(n for n in names if n))


def _remaining_text_with(dataset: Any, needles: list[re.Pattern[str]], depth: int = 0) -> list[Any]:
    """Text elements (nested included, as ``(dataset, tag)``) whose value contains one of ``needles``; the
    top-level PatientID and PatientName are left out (they are replaced by the pseudonym in place)."""
    found = []
    for element in list(dataset):
        if depth == 0 and element.keyword in TOP_LEVEL_ONLY_KEYWORDS:
            continue
        if element.VR == "SQ":
            for item in element.value:
                found.extend(_remaining_text_with(item, needles, depth + 1))
        elif element.VR in TEXT_VRS and element.value:
            text = str(element.value)
            if any(n.search(text) for n in needles):
                found.append((dataset, element.tag))
    return found


def deidentify_dataset(dataset: Any, pseudo: Pseudonymizer, patient_id: str, names: Iterable[str] = ()) -> Any:
    """Apply the Basic Application Level Confidentiality Profile (PS3.15 E.1.1) to ``dataset`` in place.

    ``patient_id`` is the original PatientID (the pseudonym and date shift are derived from it). ``names``
    (e.g. :func:`person_names` of the original header) are then searched in every remaining text element,
    nested ones included, and an element that still holds one is removed (a name typed into a free-text
    attribute the profile keeps).
    """
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    dataset.remove_private_tags()
    shift = pseudo.date_shift_days(patient_id)
    _deidentify_elements(dataset, pseudo, patient_id, shift)
    pattern = _literal([n for n in (*names, patient_id) if len(n) >= MIN_IDENTIFIER_CHARS])
    if pattern is not None:
        for holder, tag in _remaining_text_with(dataset, [pattern]):
            del holder[tag]
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


def _strings(value: Any) -> list[str]:
    """The non-empty strings of a FHIR value that may be a string or a list of them (DSTU2 vs R4 shapes)."""
    items = value if isinstance(value, list) else [value]
    return [v.strip() for v in items if isinstance(v, str) and v.strip()]


def human_name_parts(name: Any) -> list[str]:
    """Every part of a FHIR HumanName in any shape servers write: R4 (``family`` a string, ``given`` a
    list), DSTU2 (``family`` a list, ``given`` a string), ``text`` or a bare string, with the words of
    multi-word parts, so "Mary Ann" scrubs "Mary" as well. Titles (``prefix``, "Dr") are left to the
    patterns, which name the person after them."""
    if isinstance(name, str):
        parts = _strings(name)
    elif isinstance(name, dict):
        parts = [p for key in ("text", "family", "given") for p in _strings(name.get(key))]
    else:
        return []
    words = [w for p in parts for w in p.split() if len(w) >= MIN_NAME_WORD_CHARS and w != p]
    return list(dict.fromkeys(unicodedata.normalize("NFC", p) for p in (*parts, *words)))


def _names(value: Any) -> list[str]:
    """Names of a ``name`` element: a list of HumanName, or one HumanName / string where a list belongs."""
    return [part for name in (value if isinstance(value, list) else [value]) for part in human_name_parts(name)]


def _address_parts(value: Any) -> list[str]:
    out: list[str] = []
    for entry in value if isinstance(value, list) else [value]:
        if isinstance(entry, dict):
            for key in ("line", "city", "district", "postalCode", "text"):
                out.extend(_strings(entry.get(key)))
    return out


def _telecom(value: Any) -> list[str]:
    return [str(t.get("value")) for t in (value if isinstance(value, list) else [value])
            if isinstance(t, dict) and t.get("value")]


def identifiers_from_patient(resource: dict[str, Any]) -> PatientIdentifiers:
    """Names, identifiers, address parts, phones and birth date of a FHIR Patient (R4 or older shapes),
    its contacts' (next of kin) names, addresses and phones included."""
    contacts = [c for c in (resource.get("contact") or []) if isinstance(c, dict)] \
        if isinstance(resource.get("contact"), list) else []
    names = _names(resource.get("name")) + [n for c in contacts for n in _names(c.get("name"))]
    address = _address_parts(resource.get("address")) + [a for c in contacts for a in _address_parts(c.get("address"))]
    identifiers = [str(i.get("value")) for i in (resource.get("identifier") or [])
                   if isinstance(i, dict) and i.get("value")] if isinstance(resource.get("identifier"), list) else []
    phones = _telecom(resource.get("telecom")) + [t for c in contacts for t in _telecom(c.get("telecom"))]
    birth_date = resource.get("birthDate") if isinstance(resource.get("birthDate"), str) else None
    return PatientIdentifiers(str(resource.get("id", "")), tuple(dict.fromkeys(names)), tuple(identifiers),
                              tuple(dict.fromkeys(address)), tuple(dict.fromkeys(phones)), birth_date)


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
    """Scrub a free-text note: e-mail addresses, the patient's known identifiers, then generic patterns.

    Text and names are compared in Unicode NFC, so a name typed with combining accents is still found.
    """
    text = _EMAIL.sub("[EMAIL]", unicodedata.normalize("NFC", text))
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
