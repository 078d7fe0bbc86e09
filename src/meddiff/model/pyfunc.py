"""An MLflow ``pyfunc`` wrapper so a registered version serves predictions from raw model inputs.

Input: a dict of numpy arrays with the processed-data names (``image``, ``token_ids``,
``token_mask``, ``tabular``, ``tabular_missing`` and ``modality_present``); output: class
probabilities (N, classes), calibrated with the temperature saved with the model
(:mod:`meddiff.model.calibration`), as ``meddiff predict`` writes them. Weights are loaded from the
logged artifacts with ``weights_only=True``; the logged folder also holds the preprocessing artefacts
(``preprocessing/``) the model was trained with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import torch

from meddiff.data.batches import MODEL_INPUTS, model_inputs, to_tensors
from meddiff.model.calibration import calibrated, load_temperature, log_probabilities
from meddiff.model.multimodal import MedDiffModel


class MedDiffPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        #: the logged model folder: weights, spec and ``preprocessing/`` (the artefacts apply mode needs)
        self.model_dir = Path(context.artifacts["model_dir"])
        self.model = MedDiffModel.from_pretrained(self.model_dir)
        self.temperature = load_temperature(self.model_dir)

    # No type hints on purpose: MLflow 3 derives a schema from predict's hints and cannot express a
    # dict of N-d arrays; the signature is inferred from the logged input example instead.
    def predict(self, context, model_input, params=None):
        with torch.no_grad():
            batch = to_tensors({name: model_input[name] for name in (*MODEL_INPUTS, "modality_present")})
            logits = self.model(model_inputs(batch), batch["modality_present"]).logits
            probabilities = torch.softmax(logits, dim=-1).numpy()
        if self.temperature is None:  # a model saved before temperatures were: its softmax outputs
            return probabilities
        return calibrated(log_probabilities(probabilities), self.temperature)
