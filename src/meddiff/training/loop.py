"""The training loop (proposal §3.3): adaptive multimodal training, readable top to bottom.

Augment the images (random flips and shifts, :mod:`.augmentation`), sample modality masks, forward,
L = λ_diff·L_diff + λ_cls·L_cls + λ_recon·L_recon (+ λ_seg·L_seg on the training masks), backward, clip,
step, warm-up + cosine schedule;
validation AUC each epoch with early stopping; the best epoch's weights are kept.

Robustness of the run itself:

* every ``checkpoint_every_steps`` steps (and at each epoch end) the full training state — weights,
  optimiser, schedule, RNG states, position in the epoch, early-stopping state — is written
  atomically into the checkpoint directory; rerunning after a crash resumes from it and reaches the
  same final weights as an uninterrupted run;
* under ``torchrun`` the loop runs data-parallel (DDP; gloo on CPU, NCCL on GPUs); rank 0 alone
  writes checkpoints;
* on CUDA the forward pass runs under bf16 autocast (``train.bf16``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from meddiff import MODALITIES
from meddiff.config import Params, ParamsError, TrainConfig
from meddiff.data.batches import iterate_batches
from meddiff.data.brain import BRAIN_MASK_CHANNEL, IMAGE_CHANNELS
from meddiff.data.dataset import ProcessedDataset
from meddiff.metrics import classification_metrics
from meddiff.model.inference import predict_proba
from meddiff.model.multimodal import MedDiffModel, ModelSpec
from meddiff.model.ontology import token_term_index
from meddiff.training.augmentation import augment_images
from meddiff.training.checkpoint import load_training_state, save_training_state
from meddiff.training.masking import sample_modality_mask
from meddiff.training.objective import LOSS_TERMS, TrainingObjective, class_weights
from meddiff.training.seeding import AUGMENT_SEED_OFFSET, NOISE_SEED_OFFSET, seed_everything

LOG = logging.getLogger(__name__)
STATE_FILE = "state.pt"
BRAIN_MASK = IMAGE_CHANNELS[BRAIN_MASK_CHANNEL]
BEST_DIR = "best"


class TrainingInterruptedError(RuntimeError):
    """Raised by ``stop_after_steps``: the run stopped on purpose, as a crash would stop it."""


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


def resolve_device(config: TrainConfig) -> torch.device:
    """``train.device`` as a torch device (``auto``: CUDA when available).

    Under ``torchrun`` each process takes the GPU of its ``LOCAL_RANK`` (one process per GPU on a node),
    so data-parallel ranks on one node never share a device.

    Raises:
        RuntimeError: ``cuda`` asked for and none available.
    """
    if config.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available() else
                          "cpu" if config.device == "auto" else config.device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device


def init_distributed(device: torch.device) -> Distributed:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank=dist.get_rank(), world_size=dist.get_world_size())


def model_modalities(params: Params, data: ProcessedDataset) -> tuple[str, ...]:
    """The modalities the model is built for, in :data:`meddiff.MODALITIES` order: those of ``train.modalities``
    the dataset has (``dataset.modalities``) and at least one training patient has. The others cost nothing
    (their encoders and decoders never run) and are never masked or imputed.

    Raises:
        ParamsError: no modality is left.
    """
    train = data.indices("train")
    in_data = data.arrays["modality_present"][train if len(train) else slice(None)].any(axis=0)
    wanted = set(params.train.modalities) & set(params.dataset.modalities)
    chosen = tuple(m for m, seen in zip(MODALITIES, in_data, strict=True) if m in wanted and seen)
    if not chosen:
        raise ParamsError(f"no modality to train on: train.modalities {params.train.modalities}, dataset.modalities "
                          f"{params.dataset.modalities}, in the training data "
                          f"{[m for m, seen in zip(MODALITIES, in_data, strict=True) if seen]}")
    skipped = [m for m in MODALITIES if m not in chosen]
    if skipped:
        LOG.info("model: modalities %s (not built for %s)", list(chosen), skipped)
    return chosen


def build_model(data: ProcessedDataset, params: Params) -> MedDiffModel:
    """A freshly initialised model sized for ``data`` (classes, features, vocabulary, volume shape)."""
    modalities = model_modalities(params, data)
    spec = ModelSpec(
        n_classes=data.n_classes,
        n_tabular=data.n_tabular,
        vocab_size=data.vocab_size,
        max_note_tokens=int(data.arrays["token_ids"].shape[1]),
        spatial_size=tuple(int(s) for s in data.arrays["image"].shape[2:]),
        model=params.train.model,
        diffusion=params.train.diffusion,
        modalities=modalities,
        image_in_channels=int(data.arrays["image"].shape[1]),
        image_brain_channel=image_brain_channel(data),
        # a model without the image builds no seg head: it is then the same model whatever lambda_seg
        image_segmentation=params.train.lambda_seg > 0 and "image" in modalities,
    )
    model = MedDiffModel(spec)
    model.set_token_terms(token_term_index(data.vocabulary, spec.vocab_size))
    return model


def image_brain_channel(data: ProcessedDataset) -> int | None:
    """Index of the brain-mask channel of the processed image (``meta['image_channels']``), or None."""
    names = list(data.meta.get("image_channels", []))
    return names.index(BRAIN_MASK) if BRAIN_MASK in names else None


def parameter_groups(model: MedDiffModel, config: TrainConfig) -> list[dict]:
    """AdamW parameter groups: one group at ``learning_rate``, or, with ``image_lr_multiplier`` ≠ 1, the image
    encoder's parameters in a second group at ``learning_rate × image_lr_multiplier`` (the schedule scales
    both alike). One group when the multiplier is 1, so such runs and their checkpoints are unchanged."""
    if config.image_lr_multiplier == 1.0:
        return [{"params": list(model.parameters())}]
    image = {id(p) for p in model.image_encoder.parameters()}
    return [
        {"params": [p for p in model.parameters() if id(p) not in image]},
        {"params": list(model.image_encoder.parameters()),
         "lr": config.learning_rate * config.image_lr_multiplier},
    ]


def warmup_cosine(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    """Learning-rate multiplier: linear warm-up over ``warmup_fraction`` of the steps (at least one),
    then cosine decay to 0."""
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


def validation_auc(model: MedDiffModel, data: ProcessedDataset) -> dict:
    """Classification metrics of ``model`` on the val split, every present modality in use."""
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
    model, the final loop state and the step the run resumed from (0 for a fresh run).

    Raises:
        ValueError: the train or val split is empty.
        TrainingInterruptedError: ``stop_after_steps`` reached.
    """
    config = params.train
    device = resolve_device(config)
    dist = init_distributed(device)
    seed_everything(params.seed + dist.rank)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    mask_generator = torch.Generator().manual_seed(params.seed + dist.rank)
    noise_generator = torch.Generator(device=device).manual_seed(params.seed + NOISE_SEED_OFFSET + dist.rank)
    augment_generator = torch.Generator().manual_seed(params.seed + AUGMENT_SEED_OFFSET + dist.rank)

    model = build_model(data, params).to(device)
    train_index = data.indices("train")
    if len(train_index) == 0 or len(data.indices("val")) == 0:
        raise ValueError("the processed data needs non-empty train and val splits")
    weights = (class_weights(data.arrays["label"][train_index], data.n_classes, config.class_weight_power)
               if config.class_weighting else None)
    objective: torch.nn.Module = TrainingObjective(
        model, config, None if weights is None else weights.to(device), noise_generator
    )
    if dist.world_size > 1:
        objective = torch.nn.parallel.DistributedDataParallel(objective, find_unused_parameters=True)
    optimizer = torch.optim.AdamW(parameter_groups(model, config), lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(epoch_order(train_index, params.seed, 0, dist)) / config.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(steps_per_epoch * config.epochs, config.lr_warmup_fraction)
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16 and device.type == "cuda")

    state = LoopState()
    saved = load_training_state(checkpoint_dir / STATE_FILE)
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        mask_generator.set_state(saved["mask_generator"])
        noise_generator.set_state(saved["noise_generator"].to(noise_generator.get_state().device))
        if "augment_generator" in saved:  # states written before augmentation existed lack it
            augment_generator.set_state(saved["augment_generator"])
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
                "augment_generator": augment_generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "loop": state.__dict__,
            })

    progress = tqdm(total=config.epochs, initial=state.epoch, desc="train", unit="epoch", disable=None)
    while state.epoch < config.epochs:
        model.train()
        epoch_started = time.perf_counter()
        p = masking_probability(config, state.epoch)
        order = epoch_order(train_index, params.seed, state.epoch, dist)
        segmenting = model.spec.image_segmentation and "image" in model.spec.modalities
        batches = iterate_batches(data, order[state.step_in_epoch * config.batch_size :], config.batch_size,
                                  shuffle=False, device=device, lesion_masks=segmenting)
        for batch in batches:
            if "image" in model.spec.modalities and (config.augment_flip_p > 0 or config.augment_max_shift_voxels > 0):
                image, mask = augment_images(batch["image"].cpu(), augment_generator, config.augment_flip_p,
                                             config.augment_max_shift_voxels,
                                             mask=batch["lesion_mask"].cpu() if segmenting else None)
                batch["image"] = image.to(device)
                if mask is not None:
                    batch["lesion_mask"] = mask.to(device)
            allowed = model.allowed_modalities.cpu()
            # A masked modality is presented to the model as absent.
            masked_present = sample_modality_mask(batch["modality_present"].cpu() & allowed, p, mask_generator)
            with autocast:
                losses = objective(batch, masked_present.to(device))
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
                model.save_pretrained(checkpoint_dir / BEST_DIR)
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
    return MedDiffModel.from_pretrained(checkpoint_dir / BEST_DIR), state, resumed_from
