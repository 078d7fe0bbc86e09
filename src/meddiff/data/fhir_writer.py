"""FHIR R4 resources (Patient, Observation, Condition, DocumentReference) for synthetic data, one JSON per line.

Observations carry a LOINC code (``http://loinc.org``) and a UCUM quantity
(``http://unitsofmeasure.org``), as FHIR R4 ``Observation.valueQuantity`` prescribes; Conditions an
ICD-10 code (``http://hl7.org/fhir/sid/icd-10``). See https://hl7.org/fhir/R4/.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

LOINC_SYSTEM = "http://loinc.org"
UCUM_SYSTEM = "http://unitsofmeasure.org"
ICD10_SYSTEM = "http://hl7.org/fhir/sid/icd-10"
CATEGORY_SYSTEM = "http://terminology.hl7.org/CodeSystem/observation-category"


@dataclass(frozen=True)
class LabSpec:
    """How one lab is written: LOINC code, display, canonical UCUM unit, observation category."""

    loinc: str
    display: str
    unit: str
    category: str


#: canonical lab -> how the cohort writes it (code and unit agree with the default params dataset.features)
LABS: dict[str, LabSpec] = {
    "wbc": LabSpec("6690-2", "Leukocytes [#/volume] in Blood by Automated count", "10*3/uL", "laboratory"),
    "crp": LabSpec("1988-5", "C reactive protein [Mass/volume] in Serum or Plasma", "mg/L", "laboratory"),
    "glucose": LabSpec("14749-6", "Glucose [Moles/volume] in Serum or Plasma", "mmol/L", "laboratory"),
    "systolic_bp": LabSpec("8480-6", "Systolic blood pressure", "mm[Hg]", "vital-signs"),
    "inr": LabSpec("6301-6", "INR in Platelet poor plasma by Coagulation assay", "{INR}", "laboratory"),
    "temperature": LabSpec("8310-5", "Body temperature", "Cel", "vital-signs"),
}

#: alternative reporting of some labs: lab -> (LOINC code, display, UCUM unit, canonical -> alternative)
ALTERNATIVE_UNITS: dict[str, tuple[str, str, str, float, float]] = {
    # glucose mg/dL = mmol/L × 18.016 (molar mass 180.16 g/mol)
    "glucose": ("2345-7", "Glucose [Mass/volume] in Serum or Plasma", "mg/dL", 18.016, 0.0),
    # [degF] = Cel × 9/5 + 32
    "temperature": ("8310-5", "Body temperature", "[degF]", 1.8, 32.0),
}

#: per diagnosis: lab -> (distribution, location, scale); lognormal location/scale on the log scale
LAB_MODELS: dict[str, dict[str, tuple[str, float, float]]] = {
    "healthy": {
        "wbc": ("normal", 7.2, 2.0), "crp": ("lognormal", np.log(4.0), 0.9),
        "glucose": ("normal", 5.8, 1.2), "systolic_bp": ("normal", 132.0, 18.0),
        "inr": ("normal", 1.02, 0.12), "temperature": ("normal", 36.8, 0.4),
    },
    "ischemic_stroke": {
        "wbc": ("normal", 8.0, 2.2), "crp": ("lognormal", np.log(6.0), 0.9),
        "glucose": ("normal", 6.8, 1.8), "systolic_bp": ("normal", 150.0, 22.0),
        "inr": ("normal", 1.06, 0.15), "temperature": ("normal", 36.9, 0.45),
    },
    "intracerebral_hemorrhage": {
        "wbc": ("normal", 8.6, 2.4), "crp": ("lognormal", np.log(6.5), 0.9),
        "glucose": ("normal", 7.0, 1.9), "systolic_bp": ("normal", 162.0, 24.0),
        "inr": ("normal", 1.22, 0.35), "temperature": ("normal", 36.95, 0.45),
    },
    "brain_abscess": {
        "wbc": ("normal", 10.5, 3.5), "crp": ("lognormal", np.log(18.0), 1.1),
        "glucose": ("normal", 6.0, 1.3), "systolic_bp": ("normal", 132.0, 18.0),
        "inr": ("normal", 1.08, 0.15), "temperature": ("normal", 37.4, 0.7),
    },
}


def sample_lab(rng: np.random.Generator, diagnosis: str, lab: str) -> float:
    """One lab value in its canonical unit for a patient with ``diagnosis`` (overlapping classes)."""
    models = LAB_MODELS.get(diagnosis, LAB_MODELS["healthy"])
    distribution, location, scale = models[lab]
    draw = rng.lognormal if distribution == "lognormal" else rng.normal
    value = float(draw(location, scale))
    low = {"wbc": 1.5, "crp": 0.1, "glucose": 2.5, "systolic_bp": 80.0, "inr": 0.8, "temperature": 35.0}[lab]
    return max(value, low)


def dumps(resource: dict[str, Any]) -> str:
    """One NDJSON line (compact JSON, no trailing newline)."""
    return json.dumps(resource, separators=(",", ":"))


@dataclass(frozen=True)
class FakeIdentity:
    """Realistic-looking but invented PHI, written so that de-identification is testable."""

    given: str
    family: str
    street: str
    city: str
    postal_code: str
    phone: str
    physician: tuple[str, str]  # (given, family) of the referring physician

    @property
    def full_name(self) -> str:
        return f"{self.given} {self.family}"


def patient_resource(
    patient_id: str, gender: str, birth_date: str, site: str, identity: FakeIdentity | None = None
) -> dict[str, Any]:
    """FHIR R4 Patient; with ``identity``, also name, address and telecom (all invented)."""
    resource: dict[str, Any] = {
        "resourceType": "Patient",
        "id": patient_id,
        "identifier": [{"system": "urn:meddiff:synthetic-patient", "value": patient_id}],
    }
    if identity is not None:
        resource["name"] = [{"use": "official", "family": identity.family, "given": [identity.given]}]
        resource["telecom"] = [{"system": "phone", "value": identity.phone, "use": "home"}]
        resource["address"] = [{"use": "home", "line": [identity.street], "city": identity.city,
                                "postalCode": identity.postal_code, "country": "US"}]
    resource.update({
        "gender": gender,
        "birthDate": birth_date,
        "managingOrganization": {"reference": f"Organization/{site}"},
    })
    return resource


def observation_resource(
    observation_id: str, patient_id: str, lab: str, value: float, effective: str,
    alternative_unit: bool = False, unit_override: str | None = None, spec: LabSpec | None = None,
) -> dict[str, Any]:
    """FHIR R4 Observation with a LOINC code and a UCUM valueQuantity; ``spec`` (default ``LABS[lab]``) says how
    the lab is coded."""
    spec = LABS[lab] if spec is None else spec
    code, display, unit = spec.loinc, spec.display, spec.unit
    if alternative_unit and lab in ALTERNATIVE_UNITS:
        code, display, unit, factor, offset = ALTERNATIVE_UNITS[lab]
        value = value * factor + offset
    if unit_override is not None:
        unit = unit_override
    return {
        "resourceType": "Observation",
        "id": observation_id,
        "status": "final",
        "category": [{"coding": [{"system": CATEGORY_SYSTEM, "code": spec.category}]}],
        "code": {"coding": [{"system": LOINC_SYSTEM, "code": code, "display": display}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": effective,
        "valueQuantity": {"value": round(value, 2), "unit": unit, "system": UCUM_SYSTEM, "code": unit},
    }


def condition_resource(condition_id: str, patient_id: str, icd10: str, display: str, onset: str) -> dict[str, Any]:
    """FHIR R4 Condition coded in ICD-10."""
    return {
        "resourceType": "Condition",
        "id": condition_id,
        "clinicalStatus": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]
        },
        "verificationStatus": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "confirmed"}]
        },
        "code": {"coding": [{"system": ICD10_SYSTEM, "code": icd10, "display": display}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "onsetDateTime": onset,
    }


#: LOINC document type of a note (https://loinc.org/11506-3/ "Progress note")
NOTE_LOINC = ("11506-3", "Progress note")


def document_reference_resource(document_id: str, patient_id: str, text: str, date: str) -> dict[str, Any]:
    """FHIR R4 DocumentReference holding ``text`` as an inline base64 ``text/plain; charset=utf-8``
    attachment (https://hl7.org/fhir/R4/documentreference.html); ``date`` is a FHIR instant."""
    return {
        "resourceType": "DocumentReference",
        "id": document_id,
        "status": "current",
        "type": {"coding": [{"system": LOINC_SYSTEM, "code": NOTE_LOINC[0], "display": NOTE_LOINC[1]}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "date": date,
        "content": [{"attachment": {"contentType": "text/plain; charset=utf-8",
                                    "data": base64.b64encode(text.encode("utf-8")).decode("ascii")}}],
    }
