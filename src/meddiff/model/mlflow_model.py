"""MLflow "models from code" entry point: logging this file (not a pickled object) means loading a
registered version runs our reviewed code instead of deserialising arbitrary objects."""

import mlflow.models

from meddiff.model.pyfunc import MedDiffPyfunc

mlflow.models.set_model(MedDiffPyfunc())
