"""An MLflow ``pyfunc`` wrapper so a registered version serves predictions from raw model inputs.

Input: a dict of numpy arrays with the processed-data names (``image``, ``token_ids``,
``token_mask``, ``tabular``, ``tabular_missing`` and ``modality_present``); output: class
probabilities (N, classes). Weights are loaded from the logged artifacts with ``weights_only=True``.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np
import torch


class MedDiffPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from meddiff.training.checkpoint import load_model

        self.model = load_model(context.artifacts["model_dir"])

    # No type hints on purpose: MLflow 3 derives a schema from predict's hints and cannot express a
    # dict of N-d arrays; the signature is inferred from the logged input example instead.
    def predict(self, context, model_input, params=None):
        with torch.no_grad():
            inputs = {
                "image": torch.as_tensor(np.asarray(model_input["image"], dtype=np.float32)),
                "token_ids": torch.as_tensor(np.asarray(model_input["token_ids"], dtype=np.int64)),
                "token_mask": torch.as_tensor(np.asarray(model_input["token_mask"], dtype=bool)),
                "tabular": torch.as_tensor(np.asarray(model_input["tabular"], dtype=np.float32)),
                "tabular_missing": torch.as_tensor(np.asarray(model_input["tabular_missing"], dtype=bool)),
            }
            used = torch.as_tensor(np.asarray(model_input["modality_present"], dtype=bool))
            logits = self.model(inputs, used).logits
            return torch.softmax(logits, dim=-1).numpy()
