"""Batch prediction for new patients (``meddiff predict``): a raw drop through apply-mode ingest and
preprocess with the artefacts saved with a model, class probabilities per patient, FHIR R4 RiskAssessments."""
