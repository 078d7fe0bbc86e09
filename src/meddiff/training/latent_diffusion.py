"""Second training phase: the latent diffusion U-Net on the frozen encoders' latents.

As in latent diffusion models (Rombach et al. 2022), the denoiser is fitted on the latent space of
an already-trained encoder: here the best-validation multimodal model. Its latent stacks
[z, h_image, h_text, h_tabular] for the training split are computed once; only ε_θ is updated, with
the same loss (Ho et al. 2020, eq. 14) over the channels each patient has. The encoders, fusion and
classifier are untouched, so diagnosis is unchanged while sampling and imputation improve.
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
    generator = torch.Generator().manual_seed(params.seed + REFINE_SEED_OFFSET)
    order_rng = np.random.default_rng(params.seed + REFINE_SEED_OFFSET)
    optimizer = torch.optim.AdamW(model.diffusion.parameters(), lr=config.refine_learning_rate)
    model.diffusion.train()
    losses = []
    for epoch in tqdm(range(config.refine_epochs), desc="latent diffusion", unit="epoch", disable=None):
        order = torch.from_numpy(order_rng.permutation(len(index)))
        total = 0.0
        for start in range(0, len(order), config.refine_batch_size):
            rows = order[start : start + config.refine_batch_size]
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
