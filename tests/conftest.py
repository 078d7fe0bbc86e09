"""Shared fixtures: a tiny processed dataset in the exact contract of meddiff.data.dataset, so model,
training and evaluation tests run without the data stages (those have their own tests)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from meddiff.config import Params, apply_overrides
from meddiff.data.dataset import ProcessedDataset, save_processed
from tests.trained_cohort import trained  # noqa: F401  (a session fixture: the trained tiny cohort)

CLASS_NAMES = ["healthy", "disease_a", "disease_b", "rare_c"]


def make_tiny_processed(
    directory: Path, n: int = 64, side: int = 16, seed: int = 0, n_tokens: int = 12, vocab: int = 40
) -> ProcessedDataset:
    """Learnable toy data: each class has a blob intensity, a keyword token and a lab shift."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(len(CLASS_NAMES), size=n, p=[0.4, 0.25, 0.25, 0.1])
    labels[:4] = np.arange(4)  # every class at least once
    image = rng.normal(0.3, 0.05, size=(n, 1, side, side, side)).astype(np.float32)
    mask = np.zeros((n, 1, side, side, side), dtype=np.uint8)
    for i, label in enumerate(labels):
        if label:
            c = rng.integers(4, side - 4, size=3)
            sl = tuple(slice(x - 2, x + 2) for x in c)
            image[(i, 0, *sl)] += 0.2 * label
            mask[(i, 0, *sl)] = 1
    token_ids = rng.integers(4, vocab, size=(n, n_tokens)).astype(np.int32)
    token_ids[:, 0] = 2  # [CLS]
    token_ids[:, 1] = 4 + labels  # class keyword
    token_mask = np.ones((n, n_tokens), dtype=bool)
    token_mask[:, -2:] = False
    token_ids[~token_mask] = 0
    tabular = rng.normal(size=(n, 5)).astype(np.float32)
    tabular[:, 0] += labels
    missing = rng.random((n, 5)) < 0.1
    tabular[missing] = 0.0
    present = np.ones((n, 3), dtype=bool)
    present[rng.random(n) < 0.1, 1] = False
    split = np.array(["train"] * n, dtype=object)
    order = rng.permutation(n)
    split[order[: n // 5]] = "val"
    split[order[n // 5 : 2 * n // 5]] = "test"
    for c in range(len(CLASS_NAMES)):  # every class in every split
        members = np.flatnonzero(labels == c)
        for s, member in zip(("train", "val", "test"), members, strict=False):
            split[member] = s
    arrays = {
        "patient_id": np.array([f"p{i:04d}" for i in range(n)]),
        "label": labels.astype(np.int64),
        "split": split.astype(str),
        "site": np.where(rng.random(n) < 0.15, "site_b", "site_a"),
        "image": np.clip(image, 0, 1).astype(np.float16),
        "lesion_mask": mask,
        "has_lesion_mask": labels > 0,
        "token_ids": token_ids,
        "token_mask": token_mask,
        "tabular": tabular,
        "tabular_missing": missing,
        "modality_present": present,
    }
    meta = {
        "class_names": CLASS_NAMES,
        "vocab_size": vocab,
        "max_note_tokens": n_tokens,
        "spatial_size": [side] * 3,
        "tabular_features": [
            {"name": f"lab{i}", "unit": "1", "mean": 0.0, "std": 1.0, "median": 0.0} for i in range(5)
        ],
    }
    save_processed(directory, arrays, meta)
    return ProcessedDataset(arrays, meta)


TINY_OVERRIDES = [
    "train.epochs=2",
    "train.batch_size=16",
    "train.model.image_channels=[4,8]",
    "train.model.d_model=16",
    "train.model.n_heads=2",
    "train.model.text_layers=1",
    "train.model.tabular_hidden=16",
    "train.diffusion.unet_channels=[8,16]",
    "train.diffusion.num_train_timesteps=50",
    "evaluate.n_repeats=1",
    "generate.n_per_class=3",
    "train.diffusion.refine_epochs=3",
    "generate.num_inference_steps=5",
    "explain.n_patients=2",
]


@pytest.fixture
def tiny_params(tmp_path: Path) -> Params:
    """Tiny model params whose MLflow store lives in the test's tmp dir."""
    overrides = [
        *TINY_OVERRIDES,
        f"paths.checkpoints={tmp_path}/checkpoints",
        f"tracking.tracking_uri=sqlite:///{tmp_path}/mlruns.db",
        f"tracking.artifact_location={tmp_path}/mlartifacts",
    ]
    return apply_overrides(Params(), overrides)


@pytest.fixture
def tiny_processed(tmp_path: Path) -> tuple[Path, ProcessedDataset]:
    directory = tmp_path / "processed"
    return directory, make_tiny_processed(directory)


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny model trained once per session: params, processed dir, model dir, train result."""
    from meddiff.training.train import run_train

    os.environ.pop("MLFLOW_TRACKING_URI", None)
    root = tmp_path_factory.mktemp("trained")
    processed = root / "processed"
    data = make_tiny_processed(processed, n=72)
    params = apply_overrides(
        Params(),
        [
            *TINY_OVERRIDES,
            "train.epochs=4",
            "train.diffusion.impute_missing_latents=true",  # evaluate then also scores diffusion imputation
            f"paths.checkpoints={root}/checkpoints",  # not the working tree's: parallel sessions share it
            f"tracking.tracking_uri=sqlite:///{root}/mlruns.db",
            f"tracking.artifact_location={root}/mlartifacts",
        ],
    )
    result = run_train(params, processed, root / "models")
    return {"root": root, "params": params, "processed": processed, "models": root / "models",
            "data": data, "result": result}
