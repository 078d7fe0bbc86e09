"""Second training phase: the latent diffusion U-Net on the frozen encoders' latents.

As in latent diffusion models (Rombach et al. 2022), the denoiser is fitted on the latent space of
an already-trained encoder: here the best-validation multimodal model. Its latent stacks
[z, h_image, h_text, h_tabular] for the training split are computed once; only ε_θ is updated, with
the same loss (Ho et al. 2020, eq. 14) over the channels each patient has. The encoders, fusion and
classifier are untouched, so diagnosis is unchanged while sampling and imputation improve.

Before the first step the diffusion model's latent scaler is fitted on these stacks (per channel and
dimension to zero mean and unit variance, Rombach et al. 2022; :meth:`LatentDiffusion.fit_scaler`):
without it the model, trained for a few hundred steps on latents whose dimensions vary by 0.001-1.4
around offsets near ±1, sampled latents 50× the real floor's Fréchet distance away (issue 12).

With ``train.diffusion.dp.enabled`` the refinement is DP-SGD (Abadi et al. 2016, "Deep learning with
differential privacy") with opacus: each step takes a Poisson sample of the training patients (each with
probability q = batch / n), clips every patient's gradient to ``max_grad_norm`` (opacus' per-sample
gradients), adds Gaussian noise of standard deviation ``noise_multiplier × max_grad_norm`` to their sum and
averages over the expected batch. ε at δ is the RDP accountant's (Mironov 2017) for the steps taken,
stored with the weights (:meth:`LatentDiffusion.record_dp_accounting`). What it covers: the U-Net's training on
the latents. The latent scaler (per-dimension mean and standard deviation of the training latents) and the
encoders that made the latents saw the patients without DP, so the guarantee is for the diffusion model's
updates, not for the released model as a whole.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from meddiff.config import DiffusionDPConfig, Params
from meddiff.data.dataset import ProcessedDataset
from meddiff.model.inference import encode_latent_stacks
from meddiff.model.latent_stack import LatentStack
from meddiff.model.multimodal import MedDiffModel
from meddiff.training.seeding import REFINE_SEED_OFFSET

LOG = logging.getLogger(__name__)
LOG_EVERY_EPOCHS = 10  # the refinement runs many short epochs; MLflow gets every tenth and the last


def refine_latent_diffusion(
    model: MedDiffModel,
    data: ProcessedDataset,
    params: Params,
    log_metrics: Callable[..., None] | None = None,
) -> list[float]:
    """Fit ``model.diffusion`` on frozen latents; return the mean loss of each epoch."""
    config = params.train.diffusion
    if config.refine_epochs == 0:
        return []
    index = data.indices("train")
    stacks = encode_latent_stacks(model, data, index)
    labels = torch.from_numpy(data.arrays["label"][index].astype(np.int64))
    model.diffusion.fit_scaler(stacks.values, stacks.known)
    if config.dp.enabled:
        return _refine_private(model, stacks, labels, params, log_metrics)
    generator = torch.Generator().manual_seed(params.seed + REFINE_SEED_OFFSET)
    order_rng = np.random.default_rng(params.seed + REFINE_SEED_OFFSET)
    optimizer = torch.optim.AdamW(model.diffusion.parameters(), lr=config.refine_learning_rate,
                                  weight_decay=config.refine_weight_decay)
    model.diffusion.train()
    losses = []
    # Whole batches only (the permutation changes each epoch, so every patient is used): a short last batch, down
    # to one patient, gives Adam a full-size step along one patient's noisy gradient. On a 129-patient split,
    # batches 64, 64, 1 ended at loss 0.46 after 400 epochs, whole batches of 32 at 0.18 (issue 12). A split
    # smaller than one batch is one batch.
    batch_size = min(config.refine_batch_size, len(index))
    for epoch in tqdm(range(config.refine_epochs), desc="latent diffusion", unit="epoch", disable=None):
        order = torch.from_numpy(order_rng.permutation(len(index))[: len(index) // batch_size * batch_size])
        total = 0.0
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = stacks[rows]
            loss = model.diffusion.loss(batch.values, labels[rows], channel_known=batch.known, generator=generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(rows)
        losses.append(total / len(order))
        if log_metrics is not None and (epoch % LOG_EVERY_EPOCHS == 0 or epoch == config.refine_epochs - 1):
            log_metrics({"refine_diffusion_loss": losses[-1]}, step=epoch)
    model.diffusion.eval()
    LOG.info("latent diffusion refined for %d epochs: loss %.4f → %.4f", len(losses), losses[0], losses[-1])
    return losses


def dp_noise_multiplier(config: DiffusionDPConfig, sample_rate: float, steps: int, delta: float) -> float:
    """The noise multiplier of ``config``: its own, or the smallest that keeps the RDP ε over ``steps`` steps of
    sampling rate ``sample_rate`` at ``config.target_epsilon`` for ``delta``."""
    if config.target_epsilon is None:
        return config.noise_multiplier
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=config.target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps, accountant="rdp"))


def dp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε at ``delta`` of ``steps`` Poisson-subsampled Gaussian steps (RDP accountant, opacus)."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    return float(accountant.get_epsilon(delta))


def _refine_private(
    model: MedDiffModel,
    stacks: LatentStack,
    labels: torch.Tensor,
    params: Params,
    log_metrics: Callable[..., None] | None,
) -> list[float]:
    """The refinement as DP-SGD (module docstring); records ε and δ on ``model.diffusion``."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    config = params.train.diffusion
    n = len(labels)
    batch_size = min(config.refine_batch_size, n)
    sample_rate = batch_size / n
    steps_per_epoch = max(1, n // batch_size)
    steps = config.refine_epochs * steps_per_epoch
    delta = config.dp.delta if config.dp.delta is not None else 1.0 / n
    noise_multiplier = dp_noise_multiplier(config.dp, sample_rate, steps, delta)
    generator = torch.Generator().manual_seed(params.seed + REFINE_SEED_OFFSET)
    noise_generator = torch.Generator().manual_seed(params.seed + REFINE_SEED_OFFSET + 1)
    sampling_rng = np.random.default_rng(params.seed + REFINE_SEED_OFFSET)
    # The hooks that compute per-patient gradients sit on the U-Net's layers, so model.diffusion.loss (which
    # calls them directly) is differentiated per patient; they are removed before the model is returned.
    private = GradSampleModule(model.diffusion, loss_reduction="mean")
    optimizer = DPOptimizer(
        torch.optim.AdamW(model.diffusion.parameters(), lr=config.refine_learning_rate,
                          weight_decay=config.refine_weight_decay),
        noise_multiplier=noise_multiplier, max_grad_norm=config.dp.max_grad_norm, expected_batch_size=batch_size,
        loss_reduction="mean", generator=noise_generator,
    )
    model.diffusion.train()
    losses = []
    try:
        with warnings.catch_warnings():
            # opacus' backward hooks fire on the first layer, whose input (the noisy latent) needs no gradient
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for epoch in tqdm(range(config.refine_epochs), desc="latent diffusion (DP)", unit="epoch", disable=None):
                total, seen = 0.0, 0
                for _ in range(steps_per_epoch):
                    rows = torch.from_numpy(np.flatnonzero(sampling_rng.random(n) < sample_rate))
                    optimizer.zero_grad(set_to_none=True)
                    if len(rows) == 0:
                        # An empty Poisson batch releases nothing about any patient; the step is still counted in ε.
                        continue
                    batch = stacks[rows]
                    loss = model.diffusion.loss(batch.values, labels[rows], channel_known=batch.known,
                                                generator=generator)
                    loss.backward()
                    optimizer.step()
                    total += float(loss.detach()) * len(rows)
                    seen += len(rows)
                losses.append(total / max(seen, 1))
                if log_metrics is not None and (epoch % LOG_EVERY_EPOCHS == 0 or epoch == config.refine_epochs - 1):
                    log_metrics({"refine_diffusion_loss": losses[-1]}, step=epoch)
    finally:
        private._close()
    model.diffusion.eval()
    epsilon = dp_epsilon(noise_multiplier, sample_rate, steps, delta)
    model.diffusion.record_dp_accounting({"epsilon": epsilon, "delta": delta, "noise_multiplier": noise_multiplier,
                                          "max_grad_norm": config.dp.max_grad_norm, "sample_rate": sample_rate,
                                          "steps": steps})
    if log_metrics is not None:
        log_metrics({"refine_dp_epsilon": epsilon}, step=config.refine_epochs - 1)
    LOG.info("latent diffusion refined with DP-SGD for %d epochs: loss %.4f → %.4f, ε = %.2f at δ = %.2g "
             "(noise multiplier %.3f)", len(losses), losses[0], losses[-1], epsilon, delta, noise_multiplier)
    return losses
