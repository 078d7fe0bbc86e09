"""FHIR R4 ``RiskAssessment`` resources (https://hl7.org/fhir/R4/riskassessment.html) for a hospital
system to import: one per patient, one ``prediction`` per diagnosis class with its probability.

The subject is the patient's pseudonym (``Patient/<pseudonym>``): only the holder of the
de-identification key can link it back to the record. The outcome is coded in ICD-10 with the class's own
code (the first of its ``dataset.classes`` codes), and carries the class name as text.
"""

from __future__ import annotations

import json
from typing import Any

from meddiff.data.fhir_writer import ICD10_SYSTEM

#: identifier system of the pseudonyms ingest gives patients
PSEUDONYM_SYSTEM = "urn:meddiff:pseudonym"
#: RiskAssessment.status of a finished model prediction (FHIR R4 ObservationStatus)
FINAL_STATUS = "final"
#: decimals kept of each probability (FHIR decimals are exact; six digits are plenty for a probability)
PROBABILITY_DECIMALS = 6


def risk_assessment(
    pseudonym: str, probabilities: dict[str, float], codes: dict[str, str], occurrence: str, method: str,
    modalities_present: list[str], calibration: str,
) -> dict[str, Any]:
    """One FHIR R4 RiskAssessment (a JSON-ready dict).

    Args:
        pseudonym: the patient's pseudonym (``anon-…``), the ``subject`` and ``id`` stem.
        probabilities: class name → probability in [0, 1], in the model's class order.
        codes: class name → ICD-10 code (``DatasetConfig.class_icd10``); a class without one gets text only.
        occurrence: when the assessment was made (ISO 8601 dateTime with a time zone).
        method: the model that made it (``models:/meddiff-diagnosis/3`` or a folder), ``method.text``.
        modalities_present: what the model saw (``image``, ``text``, ``tabular``), in ``note``.
        calibration: how the probabilities were calibrated, in ``note``.
    """
    predictions = []
    for name, probability in probabilities.items():
        outcome: dict[str, Any] = {"text": name}
        if name in codes:
            outcome["coding"] = [{"system": ICD10_SYSTEM, "code": codes[name]}]
        predictions.append({"outcome": outcome, "probabilityDecimal": round(float(probability), PROBABILITY_DECIMALS)})
    seen = ", ".join(modalities_present) if modalities_present else "none"
    return {
        "resourceType": "RiskAssessment",
        "id": f"meddiff-{pseudonym}",
        "status": FINAL_STATUS,
        "subject": {"reference": f"Patient/{pseudonym}",
                    "identifier": {"system": PSEUDONYM_SYSTEM, "value": pseudonym}},
        "occurrenceDateTime": occurrence,
        "method": {"text": f"meddiff multimodal diffusion model {method}"},
        "prediction": predictions,
        "note": [{"text": f"modalities present: {seen}; probabilities: {calibration}"}],
    }


def dumps(resource: dict[str, Any]) -> str:
    """One NDJSON line (compact, UTF-8, no trailing newline)."""
    return json.dumps(resource, ensure_ascii=False, separators=(",", ":"))
