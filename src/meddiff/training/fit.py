"""Fit a model: the training loop, then the latent-diffusion refinement on the frozen encoders.

The one composition of the two training phases (proposal §3.3 and the latent-diffusion second
phase), used by the ``train`` stage and by every model of the ablation/baseline suite.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from meddiff.config import Params
from meddiff.data.dataset import ProcessedDataset
from meddiff.model.multimodal import MedDiffModel
from meddiff.training.latent_diffusion import refine_latent_diffusion
from meddiff.training.loop import LoopState, train_model


@dataclass
class FitResult:
    model: MedDiffModel  # the best-validation model, its diffusion model refined; on the CPU
    state: LoopState  # the training loop's final state (history, best epoch and AUC)
    resumed_from_step: int  # 0 for a fresh run
    refine_losses: list[float]  # mean refinement loss per epoch (empty when refinement is off)


def fit(
    params: Params,
    data: ProcessedDataset,
    checkpoint_dir: Path,
    log_metrics: Callable[..., None] | None = None,
) -> FitResult:
    """Train on ``data`` (resuming from ``checkpoint_dir``), keep the best-validation epoch, then
    refine its latent diffusion model; ``log_metrics(dict, step=...)`` receives both phases' metrics."""
    model, state, resumed_from = train_model(params, data, checkpoint_dir, log_metrics=log_metrics)
    model = model.cpu()
    refine_losses = refine_latent_diffusion(model, data, params, log_metrics=log_metrics)
    return FitResult(model=model, state=state, resumed_from_step=resumed_from, refine_losses=refine_losses)
