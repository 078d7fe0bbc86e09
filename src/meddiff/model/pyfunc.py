"""An MLflow ``pyfunc`` wrapper so a registered version serves predictions from raw model inputs.

Input: a dict of numpy arrays with the processed-data names (``image``, ``token_ids``,
``token_mask``, ``tabular``, ``tabular_missing`` and ``modality_present``); output: class
probabilities (N, classes). Weights are loaded from the logged artifacts with ``weights_only=True``.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import torch

from meddiff.data.batches import MODEL_INPUTS, model_inputs, to_tensors
from meddiff.model.multimodal import MedDiffModel


class MedDiffPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        self.model = MedDiffModel.from_pretrained(context.artifacts["model_dir"])

    # No type hints on purpose: MLflow 3 derives a schema from predict's hints and cannot express a
    # dict of N-d arrays; the signature is inferred from the logged input example instead.
    def predict(self, context, model_input, params=None):
        with torch.no_grad():
            batch = to_tensors({name: model_input[name] for name in (*MODEL_INPUTS, "modality_present")})
            logits = self.model(model_inputs(batch), batch["modality_present"]).logits
            return torch.softmax(logits, dim=-1).numpy()
