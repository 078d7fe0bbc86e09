"""Temperature scaling (Guo et al. 2017): one scalar T > 0 fitted on the validation split by minimising
the negative log-likelihood of softmax(logits / T); it changes the probabilities shown, never the
predicted class. The report says that its probabilities are calibrated this way."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

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
