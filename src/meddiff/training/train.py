"""The ``train`` stage: fit the model (:func:`meddiff.training.fit.fit`), tracked in MLflow.

The best epoch's weights, with the refined latent diffusion model, and the preprocessing artefacts
(``preprocessing/``: tokenizer, scaler statistics, class names, image parameters) are written to the model
directory, logged to MLflow as a pyfunc model with an input example, registered, and given the alias
``candidate``. Checkpoints live under ``paths.checkpoints/<run key>/``: the run key hashes params and
data, so rerunning after a crash resumes the same run and a changed run never resumes a stale state.
Under ``torchrun`` every rank trains; rank 0 alone writes the model directory and the MLflow records.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from meddiff.config import Params
from meddiff.data.batches import MODEL_INPUTS, to_batch
from meddiff.data.dataset import (
    PREPROCESSING_DIR,
    ProcessedDataset,
    copy_preprocessing_artefacts,
    load_processed,
    processed_digest,
)
from meddiff.io import atomic_dir, write_json
from meddiff.model.calibration import fit_temperature, log_probabilities, negative_log_likelihood, save_temperature
from meddiff.model.inference import predict_proba
from meddiff.model.multimodal import RUN_FILE, MedDiffModel
from meddiff.monitoring.reference import MONITORING_DIR, save_reference
from meddiff.training.fit import fit
from meddiff.training.loop import train_model

HISTORY_FILE = "history.json"
REFINE_HISTORY_FILE = "diffusion_refine_history.json"


@dataclass
class TrainResult:
    model_dir: str
    epochs_run: int
    best_epoch: int
    best_val_auc: float
    train_seconds: float
    mlflow_run_id: str
    model_uri: str
    registered_version: str
    resumed_from_step: int = 0


def data_digest(processed_dir: Path) -> str:
    """MD5 of the processed arrays (:func:`meddiff.data.dataset.processed_digest`), computed once per stage."""
    return processed_digest(processed_dir)


def _save_calibration(model_dir: Path, model: MedDiffModel, data: ProcessedDataset) -> None:
    """Fit the model's temperature on the validation split (all modalities present ones, as evaluated)."""
    val = data.indices("val")
    labels = data.arrays["label"][val]
    log_probs = log_probabilities(predict_proba(model, data, val))
    temperature = fit_temperature(log_probs, labels)
    save_temperature(model_dir, temperature, len(val), negative_log_likelihood(log_probs, labels, 1.0),
                     negative_log_likelihood(log_probs, labels, temperature))


def run_key(params: Params, data_md5: str) -> str:
    """Identifies a training run: the same params and data resume, anything else starts afresh."""
    digest = hashlib.sha256(params.train.model_dump_json().encode())
    digest.update(str(params.seed).encode())
    digest.update(data_md5.encode())
    return digest.hexdigest()[:16]


def run_train(params: Params, processed_dir: Path, model_dir: Path) -> TrainResult:
    """The ``train`` stage: fit on ``processed_dir``, write ``model_dir`` and register the model."""
    data = load_processed(processed_dir)
    data_md5 = data_digest(processed_dir)
    checkpoint_dir = Path(params.paths.checkpoints) / run_key(params, data_md5)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0:
            # Non-zero ranks train and synchronise gradients; rank 0 writes every output.
            _, state, _ = train_model(params, data, checkpoint_dir)
            return TrainResult(str(model_dir), len(state.history), state.best_epoch, state.best_auc, 0.0, "", "", "")
        return _train_and_register(params, data, data_md5, Path(model_dir), checkpoint_dir, Path(processed_dir))
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train_and_register(
    params: Params, data: ProcessedDataset, data_md5: str, model_dir: Path, checkpoint_dir: Path,
    processed_dir: Path,
) -> TrainResult:
    import mlflow

    import meddiff.model
    from meddiff import tracking

    experiment_id = tracking.setup_experiment(params.tracking)
    started = time.perf_counter()
    tags = tracking.run_tags(params, data_md5)
    with atomic_dir(model_dir) as staging, mlflow.start_run(
        experiment_id=experiment_id, run_name="train", tags=tags
    ) as run:
        mlflow.log_params(tracking.flatten({"train": params.train.model_dump(mode="json"), "seed": params.seed}))
        mlflow.log_params({"data.n_train": len(data.indices("train")), "data.n_val": len(data.indices("val"))})
        fitted = fit(params, data, checkpoint_dir, log_metrics=mlflow.log_metrics)
        state = fitted.state
        train_seconds = time.perf_counter() - started
        fitted.model.save_pretrained(staging)
        _save_calibration(staging, fitted.model, data)
        # what preprocess fitted travels with the weights (and, below, the MLflow model): apply mode needs it
        copy_preprocessing_artefacts(processed_dir, staging / PREPROCESSING_DIR)
        # the held-out patients' monitored statistics: what `meddiff monitor` compares a new drop with
        save_reference(staging / MONITORING_DIR, fitted.model, data, params.monitor.latent_components)
        write_json(staging / HISTORY_FILE, state.history)
        write_json(staging / REFINE_HISTORY_FILE, fitted.refine_losses)

        batch = to_batch(data, data.indices("val")[:2])
        input_example = {k: batch[k].numpy() for k in (*MODEL_INPUTS, "modality_present")}
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(meddiff.model.__file__).with_name("mlflow_model.py")),
            artifacts={"model_dir": str(staging)},
            input_example=input_example,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "monai", "transformers", "numpy"],
            registered_model_name=params.tracking.registered_model,
        )
        version = str(info.registered_model_version)
        tracking.set_alias(params.tracking.registered_model, tracking.CANDIDATE_ALIAS, version)
        tracking.tag_model_version(params.tracking.registered_model, version, tags)
        mlflow.log_metrics({"best_val_auc_macro": state.best_auc, "train_seconds": train_seconds})
        result = TrainResult(
            model_dir=str(model_dir),
            epochs_run=len(state.history),
            best_epoch=state.best_epoch,
            best_val_auc=float(state.best_auc),
            train_seconds=round(train_seconds, 2),
            mlflow_run_id=run.info.run_id,
            model_uri=info.model_uri,
            registered_version=version,
            resumed_from_step=fitted.resumed_from_step,
        )
        write_json(staging / RUN_FILE, {**result.__dict__, "tracking_uri": tracking.tracking_uri(params.tracking)})
    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # finished: nothing left to resume
    return result
