"""Shared by the end-to-end tests: the tiny params every whole-pipeline run uses."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from meddiff.config import apply_overrides, load_params

REPO = Path(__file__).resolve().parents[2]

#: Small enough for CI (2 cores), large enough that every class and split is populated.
TINY_PIPELINE = [
    "cohort.n_patients=60",
    "cohort.class_prevalence=[0.4, 0.25, 0.25, 0.1]",
    "train.epochs=2",
    "train.model.image_channels=[4,8]",
    "train.model.d_model=16",
    "train.model.n_heads=2",
    "train.model.text_layers=1",
    "train.diffusion.unet_channels=[8,16]",
    "train.diffusion.num_train_timesteps=50",
    "evaluate.n_repeats=1",
    "generate.n_per_class=2",
    "generate.num_inference_steps=5",
    "train.diffusion.refine_epochs=5",
    "explain.n_patients=2",
]


def _tiny_params_yaml(extra: list[str] | None = None) -> str:
    params = apply_overrides(load_params(REPO / "params.yaml"), TINY_PIPELINE + (extra or []))
    return yaml.safe_dump(params.to_dict(), sort_keys=False)



@pytest.fixture(scope="session")
def tiny_params_yaml() -> Callable[..., str]:
    """``tiny_params_yaml(extra_overrides)``: the repository's params.yaml shrunk for CI, as YAML text."""
    return _tiny_params_yaml
