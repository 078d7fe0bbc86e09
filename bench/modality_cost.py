"""What a modality the data lack costs: the training step of an EHR-only model ÷ that of the full
three-modality model (issue 13, target ≤ 0.10).

Both models are built by :func:`meddiff.training.loop.build_model` from default params, on processed sets of
the default shapes (image ``preprocess.spatial_size`` × the 5 density channels, ``max_note_tokens`` note
tokens, the 6 labs + age + sex): the full set has every modality, the EHR-only set only the tabular one
(``dataset.modalities: [tabular]``, its image and note arrays all zero, as preprocess writes them for a drop
without images or notes). One step is what :func:`meddiff.training.loop.train_model` does per batch: read
the batch, augment the images (when the model uses them), sample the modality mask, forward the training
objective, backward, clip, optimiser step. Steps of the two alternate one by one, so machine noise hits
both alike; reported: the median wall and CPU seconds per step of each, the forward/backward split, and
the ratio: of CPU time on a CPU (a shared machine's load stretches wall time, not the work done), of wall
time on a GPU.

    python bench/modality_cost.py [--steps 20] [--batch-size 16] [--device cpu] [--output F]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from meddiff import MODALITIES
from meddiff.config import Params, apply_overrides
from meddiff.data.batches import to_batch
from meddiff.data.brain import BRAIN_MASK_CHANNEL, IMAGE_CHANNELS
from meddiff.data.dataset import ProcessedDataset
from meddiff.training.augmentation import augment_images
from meddiff.training.loop import build_model
from meddiff.training.masking import sample_modality_mask
from meddiff.training.objective import TrainingObjective

#: the issue's target: an EHR-only step costs at most this fraction of a full three-modality step
TARGET_RATIO = 0.10
#: labs of the default dataset.features plus the two demographic features preprocess adds (age, sex)
N_TABULAR = 8
#: patients per processed set (batches are drawn from them in turn)
BATCHES_PER_SET = 4


def processed_set(params: Params, n: int, modalities: tuple[str, ...], seed: int) -> ProcessedDataset:
    """A processed set of the default shapes with ``modalities`` present (the others all zero), 2 classes."""
    rng = np.random.default_rng(seed)
    size = tuple(params.preprocess.spatial_size)
    tokens = params.preprocess.max_note_tokens
    labels = rng.integers(0, 2, size=n)
    image = np.zeros((n, len(IMAGE_CHANNELS), *size), dtype=np.float16)
    token_ids = np.zeros((n, tokens), dtype=np.int32)
    token_mask = np.zeros((n, tokens), dtype=bool)
    if "image" in modalities:
        image[:] = rng.random(image.shape, dtype=np.float32).astype(np.float16)
        image[:, BRAIN_MASK_CHANNEL] = 1.0
    if "text" in modalities:
        token_ids[:] = rng.integers(4, params.preprocess.vocab_size, size=token_ids.shape)
        token_ids[:, 0] = 2  # [CLS]
        token_mask[:] = True
    tabular = rng.normal(size=(n, N_TABULAR)).astype(np.float32)
    arrays = {
        "patient_id": np.array([f"p{i:04d}" for i in range(n)]),
        "label": labels.astype(np.int64),
        "split": np.array(["train"] * n),
        "site": np.array(["site_a"] * n),
        "image": image,
        "lesion_mask": np.zeros((n, 1, *size), dtype=np.uint8),
        "has_lesion_mask": np.zeros(n, dtype=bool),
        "token_ids": token_ids,
        "token_mask": token_mask,
        "tabular": tabular,
        "tabular_missing": np.zeros_like(tabular, dtype=bool),
        "modality_present": np.tile(np.isin(MODALITIES, modalities), (n, 1)),
    }
    meta = {"class_names": ["a", "b"], "vocab_size": params.preprocess.vocab_size, "max_note_tokens": tokens,
            "image_channels": list(IMAGE_CHANNELS)}
    return ProcessedDataset(arrays, meta)


def training_step(params: Params, data: ProcessedDataset, device: torch.device,
                  seed: int) -> tuple[Callable[[int], None], dict[str, float], tuple[str, ...]]:
    """One step of ``train_model`` for batch ``i`` of ``data`` (its calls, in its order), the time split it
    accumulates, and the modalities the model was built for."""
    config = params.train
    torch.manual_seed(seed)
    model = build_model(data, params).to(device).train()
    objective = TrainingObjective(model, config, None, torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    augment, mask = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    split = {"data": 0.0, "forward": 0.0, "backward_and_step": 0.0}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(i: int) -> None:
        started = time.perf_counter()
        rows = np.arange(i * config.batch_size, (i + 1) * config.batch_size) % len(data)
        batch = to_batch(data, rows, device)
        if "image" in model.spec.modalities and (config.augment_flip_p > 0 or config.augment_max_shift_voxels > 0):
            image, _ = augment_images(batch["image"].cpu(), augment, config.augment_flip_p,
                                      config.augment_max_shift_voxels)
            batch["image"] = image.to(device)
        allowed = model.allowed_modalities.cpu()
        present = sample_modality_mask(batch["modality_present"].cpu() & allowed, config.modality_dropout_p, mask)
        sync()
        loaded = time.perf_counter()
        losses = objective(batch, present.to(device))
        sync()
        forwarded = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
        optimizer.step()
        sync()
        for key, value in zip(split, (loaded - started, forwarded - loaded, time.perf_counter() - forwarded),
                              strict=True):
            split[key] += value

    return step, split, model.spec.modalities


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="measured steps per model")
    parser.add_argument("--batch-size", type=int, default=16, help="default: train.batch_size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=None, help="write the result JSON here too")
    args = parser.parse_args()
    device = torch.device(args.device)
    full_params = apply_overrides(Params(), [f"train.batch_size={args.batch_size}"])
    ehr_params = apply_overrides(full_params, ["dataset.modalities=[tabular]"])
    n = args.batch_size * BATCHES_PER_SET
    models = {
        "full": training_step(full_params, processed_set(full_params, n, MODALITIES, 0), device, 0),
        "ehr_only": training_step(ehr_params, processed_set(ehr_params, n, ("tabular",), 0), device, 0),
    }
    for step, _, _ in models.values():  # warm-up (allocator, first-call dispatch)
        step(0)
    for _, split, _ in models.values():
        split.update(dict.fromkeys(split, 0.0))
    wall: dict[str, list[float]] = {name: [] for name in models}
    cpu: dict[str, list[float]] = {name: [] for name in models}
    for i in range(args.steps):
        for name, (step, _, _) in models.items():
            started, started_cpu = time.perf_counter(), time.process_time()
            step(i)
            wall[name].append(time.perf_counter() - started)
            cpu[name].append(time.process_time() - started_cpu)
        print(f"step {i}: " + ", ".join(f"{name} {wall[name][-1]:.3f} s" for name in models), file=sys.stderr)
    median_wall = {name: float(np.median(values)) for name, values in wall.items()}
    median_cpu = {name: float(np.median(values)) for name, values in cpu.items()}
    measured = median_cpu if device.type == "cpu" else median_wall
    ratio = measured["ehr_only"] / measured["full"]
    result = {
        "device": str(device),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "torch_threads": torch.get_num_threads(),
        "ratio_of": "median CPU seconds per step" if device.type == "cpu" else "median wall seconds per step",
        "median_wall_seconds_per_step": {name: round(value, 5) for name, value in median_wall.items()},
        "median_cpu_seconds_per_step": {name: round(value, 5) for name, value in median_cpu.items()},
        "mean_split_seconds_per_step": {name: {k: round(v / args.steps, 5) for k, v in split.items()}
                                        for name, (_, split, _) in models.items()},
        "modalities": {name: list(built) for name, (_, _, built) in models.items()},
        "ehr_only_vs_full_step": round(ratio, 4),
        "target": TARGET_RATIO,
        "meets_target": ratio <= TARGET_RATIO,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
