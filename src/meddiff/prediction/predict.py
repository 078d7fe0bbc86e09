"""The ``predict`` stage: class probabilities for a raw drop of new patients (issue 13, batch prediction).

1. the model: a registered version (``predict.model_uri``, default ``models:/<registered model>@champion``)
   or a local model folder, with the preprocessing artefacts saved beside its weights (``preprocessing/``);
2. ingest in apply mode (:func:`meddiff.data.ingest.run_ingest` with ``label_required=False``): a patient
   without a diagnosis is admitted, a malformed record is quarantined with its reason as in training;
3. preprocess in apply mode (:func:`meddiff.data.preprocess.run_preprocess_apply`): the model's tokenizer,
   scaler statistics and image parameters, nothing refitted;
4. probabilities exactly as the ``evaluate`` stage computes its test metrics
   (:func:`meddiff.model.inference.predict_proba`): absent modalities masked through ``modality_present``,
   no diffusion imputation; then calibrated with the temperature ``train`` fitted on the validation split
   (:mod:`meddiff.model.calibration`; the predicted class is the evaluated one, the probabilities are
   softmax(logits / T)).

Writes ``report_dir`` atomically: ``predictions.csv`` (pseudonym, one probability per class, predicted class,
modalities present), ``risk_assessments.ndjson`` (FHIR R4 RiskAssessment per patient), ``quarantine.jsonl``
(each rejected record with its reason; it names raw record ids and paths so the sender can fix them, so it is
PHI-bearing like ``data/quarantine``, but holds no copy of a raw file), ``quarantine_summary.json``,
``ingest/`` (``validation.json``, the great-expectations results) and ``metrics.json`` (counts).
"""

from __future__ import annotations

import csv
import datetime
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from meddiff import MODALITIES
from meddiff.config import Params
from meddiff.data.admit import QUARANTINE_RECORDS_FILE, admit_drop
from meddiff.data.dataset import PREPROCESSING_DIR
from meddiff.errors import UserError
from meddiff.io import atomic_dir, atomic_file, read_json, write_json
from meddiff.model.calibration import calibrated, load_temperature, log_probabilities
from meddiff.model.inference import predict_proba
from meddiff.model.multimodal import MedDiffModel
from meddiff.prediction.risk_assessment import dumps, risk_assessment

LOG = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.csv"
RISK_ASSESSMENTS_FILE = "risk_assessments.ndjson"
QUARANTINE_SUMMARY_FILE = "quarantine_summary.json"
#: the ledger of rejected records ingest writes (raw record ids and paths: PHI-bearing, as data/quarantine)
#: registry alias predict uses when ``predict.model_uri`` is null
DEFAULT_ALIAS = "champion"
REGISTRY_SCHEME = "models:/"
#: what the probabilities are for a model saved without a temperature (metrics.json, every RiskAssessment)
UNCALIBRATED = "not calibrated: softmax of the logits (the model was saved without a temperature)"


class ModelNotFoundError(UserError):
    """``predict.model_uri`` names no registered model version (no such model, alias or version)."""


@dataclass
class PredictResult:
    """Summary of ``meddiff predict``."""

    report_dir: str
    model_uri: str
    n_patients: int
    records_in: int
    accepted: int
    quarantined: int
    quarantined_by_reason: dict[str, int] = field(default_factory=dict)
    predicted_per_class: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def model_uri(params: Params) -> str:
    """``predict.model_uri``, or the registered model's ``champion`` alias when it is null."""
    return params.predict.model_uri or f"{REGISTRY_SCHEME}{params.tracking.registered_model}@{DEFAULT_ALIAS}"


def resolve_model_dir(params: Params, uri: str, download_dir: Path) -> Path:
    """A local model folder for ``uri``: the folder itself, or the registered version's logged folder
    downloaded into ``download_dir``.

    Raises:
        FileNotFoundError: a local ``uri`` that is no model folder, or a model without preprocessing artefacts.
        ModelNotFoundError: the registry has no such model, alias or version.
    """
    if uri.startswith(REGISTRY_SCHEME):
        import mlflow
        from mlflow.exceptions import MlflowException

        from meddiff import tracking

        tracking.setup_experiment(params.tracking)
        download_dir.mkdir(parents=True, exist_ok=True)
        try:
            loaded = mlflow.pyfunc.load_model(uri, dst_path=str(download_dir))
        except MlflowException as error:
            raise ModelNotFoundError(
                f"predict.model_uri {uri}: not in the registry at {tracking.tracking_uri(params.tracking)} "
                f"({error.message}); train and promote a model first (`make run`), or set predict.model_uri to "
                "models:/<name>/<version> or a model folder"
            ) from error
        folder = Path(loaded.unwrap_python_model().model_dir)
    else:
        folder = Path(uri)
        if not folder.is_dir():
            raise FileNotFoundError(f"predict.model_uri {uri}: no such model folder (or use models:/<name>@<alias>)")
    if not (folder / PREPROCESSING_DIR).is_dir():
        raise FileNotFoundError(f"{uri}: the model has no {PREPROCESSING_DIR}/ artefacts; it was trained before "
                                "they were saved with the model: retrain it to predict in apply mode")
    return folder


def _write_predictions(target: Path, patient_ids: np.ndarray, probs: np.ndarray, class_names: list[str],
                       present: np.ndarray) -> None:
    with atomic_file(target) as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient_pseudonym", *(f"p_{name}" for name in class_names), "predicted_class",
                         *(f"has_{name}" for name in MODALITIES)])
        for pid, row, seen in zip(patient_ids, probs, present, strict=True):
            writer.writerow([pid, *(f"{p:.6f}" for p in row), class_names[int(np.argmax(row))],
                             *(int(s) for s in seen)])


def run_predict(params: Params, new_patients_dir: Path, report_dir: Path) -> PredictResult:
    """Predict for every admissible patient of the raw drop ``new_patients_dir`` (a folder or ``s3://`` prefix)
    with the model of :func:`model_uri`; write ``report_dir`` (see the module docstring).

    Raises:
        FileNotFoundError: no raw drop, no model folder or no preprocessing artefacts.
        ValueError: no patient of the drop could be admitted (all quarantined), or labels outside the model's
            classes.
    """
    started = time.perf_counter()
    uri = model_uri(params)
    with tempfile.TemporaryDirectory(prefix="meddiff-predict-") as scratch, atomic_dir(report_dir) as staging:
        work = Path(scratch)
        model_dir = resolve_model_dir(params, uri, work / "model")
        ingest, data = admit_drop(params, Path(new_patients_dir), model_dir, work, staging)
        model = MedDiffModel.from_pretrained(model_dir)
        index = np.arange(len(data))
        temperature = load_temperature(model_dir)
        probs = predict_proba(model, data, index)
        if temperature is not None:
            probs = calibrated(log_probabilities(probs), temperature)
        calibration = (f"temperature scaling, T = {temperature:.4f} fitted on the validation split when the model was "
                       "trained" if temperature is not None else UNCALIBRATED)
        class_names = data.class_names
        present = data.arrays["modality_present"]
        patient_ids = data.arrays["patient_id"]

        _write_predictions(staging / PREDICTIONS_FILE, patient_ids, probs, class_names, present)
        occurrence = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        codes = params.dataset.class_icd10
        with atomic_file(staging / RISK_ASSESSMENTS_FILE) as handle:
            for pid, row, seen in zip(patient_ids, probs, present, strict=True):
                resource = risk_assessment(str(pid), dict(zip(class_names, row.tolist(), strict=True)), codes,
                                           occurrence, uri, [m for m, s in zip(MODALITIES, seen, strict=True) if s],
                                           calibration)
                handle.write(dumps(resource) + "\n")
        validation = read_json(staging / "ingest" / "validation.json")
        write_json(staging / QUARANTINE_SUMMARY_FILE, {
            "records_in": ingest.records_in, "accepted": ingest.accepted, "quarantined": ingest.quarantined,
            "quarantined_by_reason": ingest.quarantined_by_reason,
            "quarantined_by_kind": {kind: counts["quarantined"] for kind, counts in validation["by_kind"].items()
                                    if counts["quarantined"]},
            "records": f"{QUARANTINE_RECORDS_FILE}: each rejected record, its reason and raw location",
        })
        predicted = np.argmax(probs, axis=1)
        predicted_per_class = {name: int((predicted == c).sum()) for c, name in enumerate(class_names)}
        seconds = time.perf_counter() - started
        write_json(staging / "metrics.json", {
            "model_uri": uri,
            "n_patients": len(index),
            "records_in": ingest.records_in, "accepted": ingest.accepted, "quarantined": ingest.quarantined,
            "quarantined_by_reason": ingest.quarantined_by_reason,
            "predicted_per_class": predicted_per_class,
            "modalities_present": {name: int(present[:, i].sum()) for i, name in enumerate(MODALITIES)},
            "calibration": calibration,
            "temperature": temperature,
            "imputation": "none: absent modalities are masked, as in the evaluate stage's test metrics",
            "seconds": round(seconds, 2),
        })
    LOG.info("predict: %d patients with %s, %d records quarantined (%.1f s)", len(index), uri, ingest.quarantined,
             seconds)
    return PredictResult(
        report_dir=str(report_dir), model_uri=uri, n_patients=len(index), records_in=ingest.records_in,
        accepted=ingest.accepted, quarantined=ingest.quarantined, quarantined_by_reason=ingest.quarantined_by_reason,
        predicted_per_class=predicted_per_class, seconds=round(seconds, 2),
    )
