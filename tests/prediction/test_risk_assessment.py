"""FHIR R4 RiskAssessment resources: one prediction per class, ICD-10 coded where ingest maps a code."""

from __future__ import annotations

from fhir.resources.R4B.riskassessment import RiskAssessment

from meddiff.config import DatasetConfig
from meddiff.data.fhir_writer import ICD10_SYSTEM
from meddiff.prediction.risk_assessment import dumps, risk_assessment


def test_each_class_is_coded_with_the_first_of_its_dataset_codes() -> None:
    dataset = DatasetConfig(classes={"healthy": {"icd10": ["Z03.89"]}, "stroke": {"icd10": ["I63.9", "I63"]}})
    assert dataset.class_icd10 == {"healthy": "Z03.89", "stroke": "I63.9"}


def test_risk_assessment_validates_and_keeps_every_class() -> None:
    resource = risk_assessment(
        "anon-0123", {"healthy": 0.7, "stroke": 0.2, "rare": 0.1}, {"healthy": "Z03.89", "stroke": "I63"},
        "2026-11-30T12:00:00+00:00", "models:/meddiff-diagnosis/3", ["image", "tabular"],
        "temperature scaling, T = 1.3",
    )
    parsed = RiskAssessment.model_validate_json(dumps(resource))
    assert parsed.subject.reference == "Patient/anon-0123" and parsed.status == "final"
    outcomes = [(p.outcome.text, float(p.probabilityDecimal)) for p in parsed.prediction]
    assert outcomes == [("healthy", 0.7), ("stroke", 0.2), ("rare", 0.1)]
    assert parsed.prediction[1].outcome.coding[0].system == ICD10_SYSTEM
    assert parsed.prediction[1].outcome.coding[0].code == "I63"
    assert parsed.prediction[2].outcome.coding is None  # no code mapped: text only
    assert "image, tabular" in parsed.note[0].text and "T = 1.3" in parsed.note[0].text
