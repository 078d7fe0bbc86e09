"""The ``train`` stage: adaptive multimodal training (proposal §3.3), tracked in MLflow.

One readable loop: sample modality masks, forward, L = L_diff + λ·L_cls + λ_r·L_recon, backward,
clip, step, warm-up + cosine schedule; validation AUC each epoch with early stopping; the best
epoch's weights are kept, logged to MLflow as a pyfunc model with an input example, registered,
and given the alias ``candidate``.

Robustness of the run itself:

* every ``checkpoint_every_steps`` steps (and at each epoch end) the full training state — weights,
  optimiser, schedule, RNG states, position in the epoch, early-stopping state — is written
  atomically under ``paths.checkpoints/<run key>/``; rerunning after a crash resumes from it and
  reaches the same final weights as an uninterrupted run (the run key hashes params and data, so a
  changed run never resumes a stale state);
* under ``torchrun`` the loop runs data-parallel (DDP; gloo on CPU, NCCL on GPUs); rank 0 alone
  writes checkpoints, the model directory and MLflow records;
* on CUDA the forward pass runs under bf16 autocast (``train.bf16``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from meddiff.config import Params, TrainConfig
from meddiff.data.dataset import ARRAYS_FILE, ProcessedDataset, load_processed
from meddiff.evaluation.metrics import classification_metrics
from meddiff.io import atomic_dir, write_json
from meddiff.model.inference import predict_proba
from meddiff.model.multimodal import MedDiffModel, ModelSpec
from meddiff.model.ontology import token_term_index
from meddiff.training.batches import MODEL_INPUTS, iterate_batches, to_batch
from meddiff.training.checkpoint import load_model, load_training_state, save_model, save_training_state
from meddiff.training.latent_diffusion import refine_latent_diffusion
from meddiff.training.masking import sample_modality_mask
from meddiff.training.objective import TrainingObjective, class_weights

LOG = logging.getLogger(__name__)
RUN_FILE = "run.json"
HISTORY_FILE = "history.json"
STATE_FILE = "state.pt"
LOSS_TERMS = ("total", "cls", "diff", "recon")
BEST_DIR = "best"


class TrainingInterruptedError(RuntimeError):
    """Raised by ``stop_after_steps``: the run stopped on purpose, as a crash would stop it."""


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


@dataclass
class LoopState:
    """Where the loop is; saved in every checkpoint."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_auc: float = -math.inf
    best_epoch: int = -1
    stale_epochs: int = 0
    epoch_loss_sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LOSS_TERMS, 0.0))
    history: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(config: TrainConfig) -> torch.device:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def init_distributed(device: torch.device) -> Distributed:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank=dist.get_rank(), world_size=dist.get_world_size())


def build_model(data: ProcessedDataset, params: Params) -> MedDiffModel:
    spec = ModelSpec(
        n_classes=data.n_classes,
        n_tabular=data.n_tabular,
        vocab_size=data.vocab_size,
        max_note_tokens=int(data.arrays["token_ids"].shape[1]),
        spatial_size=tuple(int(s) for s in data.arrays["image"].shape[2:]),
        model=params.train.model,
        diffusion=params.train.diffusion,
        modalities=tuple(params.train.modalities),
    )
    model = MedDiffModel(spec)
    model.set_token_terms(token_term_index(data.vocabulary, spec.vocab_size))
    return model


def warmup_cosine(total_steps: int, warmup_fraction: float = 0.05) -> Callable[[int], float]:
    """Learning-rate multiplier: linear warm-up, then cosine decay to 0."""
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def masking_probability(config: TrainConfig, epoch: int) -> float:
    """p for this epoch: constant, or ramped linearly from 0 (curriculum)."""
    if config.masking_curriculum == "linear_warmup" and config.masking_warmup_epochs > 0:
        return config.modality_dropout_p * min(1.0, epoch / config.masking_warmup_epochs)
    return config.modality_dropout_p


def epoch_order(train_index: np.ndarray, seed: int, epoch: int, dist: Distributed) -> np.ndarray:
    """This rank's shuffled patients for ``epoch``: a pure function of (seed, epoch), so a resumed
    run sees the same order; equal-length shards so every rank runs the same number of steps."""
    order = np.random.default_rng([seed, epoch]).permutation(train_index)
    usable = len(order) // dist.world_size * dist.world_size
    return order[:usable][dist.rank :: dist.world_size]


def data_digest(processed_dir: Path) -> str:
    """MD5 of the processed arrays (the hash DVC records), computed once per stage."""
    from meddiff.tracking import file_digest

    return file_digest(Path(processed_dir) / ARRAYS_FILE)


def run_key(params: Params, data_md5: str) -> str:
    """Identifies a training run: the same params and data resume, anything else starts afresh."""
    digest = hashlib.sha256(params.train.model_dump_json().encode())
    digest.update(str(params.seed).encode())
    digest.update(data_md5.encode())
    return digest.hexdigest()[:16]


def validation_auc(model: MedDiffModel, data: ProcessedDataset) -> dict:
    index = data.indices("val")
    probs = predict_proba(model, data, index)
    return classification_metrics(data.arrays["label"][index], probs)


def train_model(
    params: Params,
    data: ProcessedDataset,
    checkpoint_dir: Path,
    log_metrics: Callable[..., None] | None = None,
    stop_after_steps: int | None = None,
) -> tuple[MedDiffModel, LoopState, int]:
    """Train (resuming from ``checkpoint_dir`` if it holds a state); return the best-validation
    model, the final loop state and the step the run resumed from (0 for a fresh run)."""
    config = params.train
    device = resolve_device(config)
    dist = init_distributed(device)
    seed_everything(params.seed + dist.rank)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    mask_generator = torch.Generator().manual_seed(params.seed + dist.rank)
    noise_generator = torch.Generator(device=device).manual_seed(params.seed + 1000 + dist.rank)

    model = build_model(data, params).to(device)
    train_index = data.indices("train")
    if len(train_index) == 0 or len(data.indices("val")) == 0:
        raise ValueError("the processed data needs non-empty train and val splits")
    weights = class_weights(data.arrays["label"][train_index], data.n_classes) if config.class_weighting else None
    objective: torch.nn.Module = TrainingObjective(
        model, config, None if weights is None else weights.to(device), noise_generator
    )
    if dist.world_size > 1:
        objective = torch.nn.parallel.DistributedDataParallel(objective, find_unused_parameters=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(epoch_order(train_index, params.seed, 0, dist)) / config.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps_per_epoch * config.epochs))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16 and device.type == "cuda")

    state = LoopState()
    saved = load_training_state(checkpoint_dir / STATE_FILE)
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        mask_generator.set_state(saved["mask_generator"])
        noise_generator.set_state(saved["noise_generator"].to(noise_generator.get_state().device))
        torch.set_rng_state(saved["torch_rng"])
        state = LoopState(**saved["loop"])
        LOG.info("resuming from %s at epoch %d step %d", checkpoint_dir, state.epoch, state.step_in_epoch)
    resumed_from = state.global_step

    def checkpoint() -> None:
        if dist.is_main:
            save_training_state(checkpoint_dir / STATE_FILE, {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "mask_generator": mask_generator.get_state(),
                "noise_generator": noise_generator.get_state().cpu(),
                "torch_rng": torch.get_rng_state(),
                "loop": state.__dict__,
            })

    progress = tqdm(total=config.epochs, initial=state.epoch, desc="train", unit="epoch", disable=None)
    while state.epoch < config.epochs:
        model.train()
        epoch_started = time.perf_counter()
        p = masking_probability(config, state.epoch)
        order = epoch_order(train_index, params.seed, state.epoch, dist)
        batches = iterate_batches(data, order[state.step_in_epoch * config.batch_size :], config.batch_size,
                                  shuffle=False, device=device)
        for batch in batches:
            allowed = model.allowed_modalities.cpu()
            used = sample_modality_mask(batch["present"].cpu() & allowed, p, mask_generator).to(device)
            with autocast:
                losses = objective(batch, used)
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
            optimizer.step()
            schedule.step()
            for key in state.epoch_loss_sums:
                state.epoch_loss_sums[key] += float(losses[key].detach()) / steps_per_epoch
            state.step_in_epoch += 1
            state.global_step += 1
            if state.global_step % config.checkpoint_every_steps == 0:
                checkpoint()
            if stop_after_steps is not None and state.global_step >= stop_after_steps:
                raise TrainingInterruptedError(f"stopped after {state.global_step} steps as asked")

        model.eval()
        val = validation_auc(model, data)
        record = {
            "epoch": state.epoch,
            **{f"train_loss_{k}": v for k, v in state.epoch_loss_sums.items()},
            "val_auc_macro": val["auc_macro"],
            "val_accuracy": val["accuracy"],
            "val_f1_macro": val["f1_macro"],
            "masking_p": p,
            "lr": schedule.get_last_lr()[0],
            "epoch_seconds": time.perf_counter() - epoch_started,
        }
        state.history.append(record)
        if log_metrics is not None and dist.is_main:
            log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=state.epoch)
        progress.update(1)
        progress.set_postfix(loss=f"{record['train_loss_total']:.3f}", val_auc=f"{val['auc_macro']:.3f}")
        LOG.info("epoch %d loss %.4f val AUC %.3f", state.epoch, record["train_loss_total"], val["auc_macro"])
        improved = val["auc_macro"] > state.best_auc
        if improved:
            state.best_auc, state.best_epoch, state.stale_epochs = val["auc_macro"], state.epoch, 0
            if dist.is_main:
                save_model(model, checkpoint_dir / BEST_DIR)
        else:
            state.stale_epochs += 1
        state.epoch += 1
        state.step_in_epoch = 0
        state.epoch_loss_sums = dict.fromkeys(state.epoch_loss_sums, 0.0)
        checkpoint()
        if not improved and state.stale_epochs >= config.early_stopping_patience:
            LOG.info("early stopping after epoch %d (best %d)", state.epoch - 1, state.best_epoch)
            break
    progress.close()
    if dist.world_size > 1:
        torch.distributed.barrier()  # rank 0 has written the best weights
    return load_model(checkpoint_dir / BEST_DIR), state, resumed_from


def run_train(params: Params, processed_dir: Path, model_dir: Path) -> TrainResult:
    data = load_processed(processed_dir)
    data_md5 = data_digest(processed_dir)
    checkpoint_dir = Path(params.paths.checkpoints) / run_key(params, data_md5)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0:
            # Non-zero ranks train and synchronise gradients; rank 0 writes every output.
            _, state, _ = train_model(params, data, checkpoint_dir)
            return TrainResult(str(model_dir), len(state.history), state.best_epoch, state.best_auc, 0.0, "", "", "")
        return _train_and_register(params, data, data_md5, Path(model_dir), checkpoint_dir)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train_and_register(
    params: Params, data: ProcessedDataset, data_md5: str, model_dir: Path, checkpoint_dir: Path
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
        model, state, resumed_from = train_model(params, data, checkpoint_dir, log_metrics=mlflow.log_metrics)
        model = model.cpu()
        refine_losses = refine_latent_diffusion(model, data, params, log_metrics=mlflow.log_metrics)
        train_seconds = time.perf_counter() - started
        save_model(model, staging)
        write_json(staging / HISTORY_FILE, state.history)
        write_json(staging / "diffusion_refine_history.json", refine_losses)

        batch = to_batch(data, data.indices("val")[:2])
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
            resumed_from_step=resumed_from,
        )
        write_json(staging / RUN_FILE, {**result.__dict__, "tracking_uri": tracking.tracking_uri(params.tracking)})
    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # finished: nothing left to resume
    return result
