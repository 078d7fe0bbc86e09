"""Batched inference over processed patients, shared by evaluate, generate and explain."""

from __future__ import annotations

import numpy as np
import torch

from meddiff.data.dataset import ProcessedDataset
from meddiff.model.multimodal import MedDiffModel
from meddiff.training.batches import MODEL_INPUTS, to_batch


@torch.no_grad()
def predict_proba(
    model: MedDiffModel,
    data: ProcessedDataset,
    index: np.ndarray,
    modality_used: np.ndarray | None = None,
    batch_size: int = 64,
    impute_missing: bool = False,
    seed: int = 0,
) -> np.ndarray:
    """Class probabilities (N, classes) for ``index``; ``modality_used`` (N, 3) defaults to what is
    present. With ``impute_missing`` the latents of unused modalities are inpainted by the latent
    diffusion model (deterministic for ``seed``)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    index = np.asarray(index)
    used_all = data.arrays["modality_present"][index] if modality_used is None else modality_used
    if used_all.shape != (len(index), 3):
        raise ValueError(f"modality_used must be ({len(index)}, 3), got {used_all.shape}")
    chunks = []
    for start in range(0, len(index), batch_size):
        batch = to_batch(data, index[start : start + batch_size])
        used = torch.from_numpy(np.asarray(used_all[start : start + batch_size], dtype=bool))
        output = model({k: batch[k] for k in MODEL_INPUTS}, used, impute_missing=impute_missing, generator=generator)
        chunks.append(torch.softmax(output.logits, dim=-1).numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, data.n_classes))


@torch.no_grad()
def encode_latent_stacks(
    model: MedDiffModel, data: ProcessedDataset, index: np.ndarray, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """The diffused latent stacks [z, h_image, h_text, h_tabular] (N, 1 + M, d) with every present
    modality in use, and which channels are known (N, 1 + M): absent modalities have no latent."""
    model.eval()
    index = np.asarray(index)
    stacks, known = [], []
    for start in range(0, len(index), batch_size):
        batch = to_batch(data, index[start : start + batch_size])
        output = model({k: batch[k] for k in MODEL_INPUTS}, batch["present"])
        stacks.append(torch.cat([output.z.unsqueeze(1), output.modality_latents], dim=1))
        known.append(torch.cat([torch.ones_like(batch["present"][:, :1]), batch["present"]], dim=1))
    stack, mask = torch.cat(stacks), torch.cat(known)
    return stack * mask.unsqueeze(-1), mask


@torch.no_grad()
def encode_latents(model: MedDiffModel, data: ProcessedDataset, index: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Fused latents z (N, d) with every present modality in use."""
    model.eval()
    index = np.asarray(index)
    chunks = []
    for start in range(0, len(index), batch_size):
        batch = to_batch(data, index[start : start + batch_size])
        chunks.append(model({k: batch[k] for k in MODEL_INPUTS}, batch["present"]).z.numpy())
    return np.concatenate(chunks)
