"""Drift between a new drop of patients and the training data, and the retraining decision it drives
(``meddiff monitor``, issue 13 "Retraining that has a reason")."""
