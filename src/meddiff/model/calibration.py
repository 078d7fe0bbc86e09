"""Temperature scaling (Guo et al. 2017): one scalar T > 0 fitted on the validation split by minimising
the negative log-likelihood of softmax(logits / T); it changes the probabilities shown, never the
predicted class. ``train`` fits it once per model and saves it beside the weights (:data:`CALIBRATION_FILE`);
``predict`` and the explanation report show probabilities calibrated with it.

Log-probabilities may stand in for logits: they differ by a per-row constant, which softmax ignores
even after division by T.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from meddiff.io import read_json, write_json

#: the model folder's calibration record: ``{"temperature": T, "fitted_on": ..., "n_patients": n, ...}``
CALIBRATION_FILE = "calibration.json"

#: Search range of log T.
LOG_TEMPERATURE_BOUNDS = (-3.0, 3.0)


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean NLL of ``labels`` (n,) under softmax(``logits`` (n, classes) / ``temperature``)."""
    log_probs = log_softmax(np.asarray(logits, float) / temperature, axis=1)
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the NLL of ``labels`` (n,) given ``logits`` (n, classes); 1.0 (no
    scaling) without validation patients."""
    if len(labels) == 0:
        return 1.0
    result = minimize_scalar(
        lambda log_t: negative_log_likelihood(logits, labels, float(np.exp(log_t))),
        bounds=LOG_TEMPERATURE_BOUNDS, method="bounded",
    )
    return float(np.exp(result.x))


def calibrated(logits: np.ndarray, temperature: float) -> np.ndarray:
    """(n, classes) softmax(``logits`` / ``temperature``)."""
    return np.exp(log_softmax(np.asarray(logits, float) / temperature, axis=1))


def log_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """(n, classes) log of softmax outputs, floored at the smallest positive float: logits up to a row constant."""
    return np.log(np.clip(np.asarray(probabilities, np.float64), np.finfo(np.float64).tiny, None))


def save_temperature(model_dir: Path, temperature: float, n_patients: int, nll_before: float, nll_after: float) -> None:
    """Write :data:`CALIBRATION_FILE` into ``model_dir`` (atomically): T and its validation NLL before/after."""
    write_json(Path(model_dir) / CALIBRATION_FILE, {
        "method": "temperature scaling (Guo et al. 2017)", "temperature": temperature,
        "fitted_on": "validation split", "n_patients": n_patients,
        "nll_before": nll_before, "nll_after": nll_after,
    })


def load_temperature(model_dir: Path) -> float | None:
    """The model's fitted temperature, or None for a model saved without one (older models)."""
    path = Path(model_dir) / CALIBRATION_FILE
    return float(read_json(path)["temperature"]) if path.is_file() else None
