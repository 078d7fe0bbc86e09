"""The ``train`` stage: adaptive multimodal training (proposal §3.3), tracked in MLflow.

One readable loop: sample modality masks, forward, L = L_diff + λ·L_cls + λ_r·L_recon, backward,
clip, step, warm-up + cosine schedule; validation AUC each epoch with early stopping; the best
epoch's weights are kept, logged to MLflow as a pyfunc model with an input example, registered,
and given the alias ``candidate``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from meddiff.config import Params
from meddiff.data.dataset import ARRAYS_FILE, ProcessedDataset, load_processed
from meddiff.evaluation.metrics import classification_metrics
from meddiff.io import atomic_dir, write_json
from meddiff.model.inference import predict_proba
from meddiff.model.multimodal import MedDiffModel, ModelSpec
from meddiff.training.batches import MODEL_INPUTS, iterate_batches, to_batch
from meddiff.training.checkpoint import load_model, save_model
from meddiff.training.masking import sample_modality_mask
from meddiff.training.objective import class_weights, compute_losses

LOG = logging.getLogger(__name__)
RUN_FILE = "run.json"
HISTORY_FILE = "history.json"


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


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def build_model(data: ProcessedDataset, params: Params) -> MedDiffModel:
    spec = ModelSpec(
        n_classes=data.n_classes,
        n_tabular=data.n_tabular,
        vocab_size=data.vocab_size,
        max_note_tokens=int(data.arrays["token_ids"].shape[1]),
        spatial_size=tuple(int(s) for s in data.arrays["image"].shape[2:]),
        model=params.train.model,
        diffusion=params.train.diffusion,
    )
    return MedDiffModel(spec)


def warmup_cosine(total_steps: int, warmup_fraction: float = 0.05) -> callable:
    """Learning-rate multiplier: linear warm-up, then cosine decay to 0."""
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def validation_auc(model: MedDiffModel, data: ProcessedDataset) -> dict:
    index = data.indices("val")
    probs = predict_proba(model, data, index)
    return classification_metrics(data.arrays["label"][index], probs)


def train_model(
    params: Params, data: ProcessedDataset, checkpoint_dir: Path, log_metrics: callable | None = None
) -> tuple[MedDiffModel, list[dict]]:
    """Train; keep the best-validation-AUC weights in ``checkpoint_dir``; return them and the history."""
    config = params.train
    generator = seed_everything(params.seed)
    rng = np.random.default_rng(params.seed)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    model = build_model(data, params)
    train_index = data.indices("train")
    if len(train_index) == 0 or len(data.indices("val")) == 0:
        raise ValueError("the processed data needs non-empty train and val splits")
    weights = class_weights(data.arrays["label"][train_index], data.n_classes) if config.class_weighting else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train_index) / config.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps_per_epoch * config.epochs))

    history: list[dict] = []
    best_auc, best_epoch, stale = -math.inf, -1, 0
    epochs = tqdm(range(config.epochs), desc="train", unit="epoch", disable=None)
    for epoch in epochs:
        model.train()
        sums = {"total": 0.0, "cls": 0.0, "diff": 0.0, "recon": 0.0}
        started = time.perf_counter()
        for batch in iterate_batches(data, train_index, config.batch_size, shuffle=True, rng=rng):
            used = sample_modality_mask(batch["present"], config.modality_dropout_p, generator)
            output = model({k: batch[k] for k in MODEL_INPUTS}, used)
            losses = compute_losses(model, batch, output, config, weights, generator)
            optimizer.zero_grad(set_to_none=True)
            losses.total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
            optimizer.step()
            schedule.step()
            for key, value in losses.as_floats().items():
                sums[key] += value / steps_per_epoch
        val = validation_auc(model, data)
        record = {
            "epoch": epoch,
            **{f"train_loss_{k}": v for k, v in sums.items()},
            "val_auc_macro": val["auc_macro"],
            "val_accuracy": val["accuracy"],
            "val_f1_macro": val["f1_macro"],
            "lr": schedule.get_last_lr()[0],
            "epoch_seconds": time.perf_counter() - started,
        }
        history.append(record)
        if log_metrics is not None:
            log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch)
        epochs.set_postfix(loss=f"{sums['total']:.3f}", val_auc=f"{val['auc_macro']:.3f}")
        LOG.info("epoch %d loss %.4f val AUC %.3f", epoch, sums["total"], val["auc_macro"])
        if val["auc_macro"] > best_auc:
            best_auc, best_epoch, stale = val["auc_macro"], epoch, 0
            save_model(model, checkpoint_dir)
        else:
            stale += 1
            if stale >= config.early_stopping_patience:
                LOG.info("early stopping at epoch %d (best %d)", epoch, best_epoch)
                break
    return load_model(checkpoint_dir), history


def run_train(params: Params, processed_dir: Path, model_dir: Path) -> TrainResult:
    import mlflow

    import meddiff.model
    from meddiff import tracking

    data = load_processed(processed_dir)
    experiment_id = tracking.setup_experiment(params.tracking)
    started = time.perf_counter()
    tags = tracking.run_tags(params, Path(processed_dir) / ARRAYS_FILE)
    with atomic_dir(model_dir) as staging, mlflow.start_run(
        experiment_id=experiment_id, run_name="train", tags=tags
    ) as run:
        mlflow.log_params(tracking.flatten({"train": params.train.model_dump(mode="json"), "seed": params.seed}))
        mlflow.log_params({"data.n_train": len(data.indices("train")), "data.n_val": len(data.indices("val"))})
        model, history = train_model(params, data, staging, log_metrics=mlflow.log_metrics)
        train_seconds = time.perf_counter() - started
        best = max(history, key=lambda r: r["val_auc_macro"])
        write_json(staging / HISTORY_FILE, history)

        example_index = data.indices("val")[:2]
        batch = to_batch(data, example_index)
        input_example = {k: batch[k].numpy() for k in MODEL_INPUTS}
        input_example["modality_present"] = batch["present"].numpy()
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
        mlflow.log_metrics({"best_val_auc_macro": best["val_auc_macro"], "train_seconds": train_seconds})
        result = TrainResult(
            model_dir=str(model_dir),
            epochs_run=len(history),
            best_epoch=int(best["epoch"]),
            best_val_auc=float(best["val_auc_macro"]),
            train_seconds=round(train_seconds, 2),
            mlflow_run_id=run.info.run_id,
            model_uri=info.model_uri,
            registered_version=version,
        )
        write_json(staging / RUN_FILE, {**result.__dict__, "tracking_uri": tracking.tracking_uri(params.tracking)})
        del model
    return result
