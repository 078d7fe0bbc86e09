"""Temperature scaling fitted by ``train`` and saved with the model (Guo et al. 2017)."""

from __future__ import annotations

import numpy as np
import pytest

from meddiff.io import read_json
from meddiff.model.calibration import (
    calibrated,
    fit_temperature,
    load_temperature,
    log_probabilities,
    negative_log_likelihood,
)
from meddiff.model.inference import predict_proba
from meddiff.model.multimodal import MedDiffModel


def test_train_saves_the_validation_temperature(trained_tiny: dict) -> None:
    data, models = trained_tiny["data"], trained_tiny["models"]
    record = read_json(models / "calibration.json")
    val = data.indices("val")
    log_probs = log_probabilities(predict_proba(MedDiffModel.from_pretrained(models), data, val))
    labels = data.arrays["label"][val]
    assert load_temperature(models) == record["temperature"] == pytest.approx(fit_temperature(log_probs, labels))
    assert record["n_patients"] == len(val)
    assert record["nll_after"] <= record["nll_before"] + 1e-12  # T = 1 is in the search range
    assert record["nll_after"] == pytest.approx(negative_log_likelihood(log_probs, labels, record["temperature"]))


def test_log_probabilities_stand_in_for_logits() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 4)) * 3
    softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    for temperature in (0.5, 1.0, 2.5):
        np.testing.assert_allclose(calibrated(log_probabilities(softmax), temperature), calibrated(logits, temperature),
                                   rtol=1e-10, atol=1e-12)
    assert calibrated(logits, 2.0).argmax(axis=1).tolist() == logits.argmax(axis=1).tolist()


def test_a_model_without_a_temperature_has_none(tmp_path) -> None:
    assert load_temperature(tmp_path) is None
