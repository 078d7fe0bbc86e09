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
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from meddiff.config import Params
from meddiff.data.dataset import ProcessedDataset
from meddiff.model.inference import encode_latent_stacks
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
    generator = torch.Generator().manual_seed(params.seed + REFINE_SEED_OFFSET)
    order_rng = np.random.default_rng(params.seed + REFINE_SEED_OFFSET)
    optimizer = torch.optim.AdamW(model.diffusion.parameters(), lr=config.refine_learning_rate)
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
