"""Batched inference over processed patients, shared by training (validation, refinement), evaluate,
generate and explain."""

from __future__ import annotations

import numpy as np
import torch

from meddiff import MODALITIES
from meddiff.data.batches import model_inputs, to_batch
from meddiff.data.dataset import ProcessedDataset
from meddiff.model.latent_stack import LatentStack
from meddiff.model.multimodal import MedDiffModel


@torch.no_grad()
def predict_proba(
    model: MedDiffModel,
    data: ProcessedDataset,
    index: np.ndarray,
    modality_present: np.ndarray | None = None,
    batch_size: int = 64,
    impute_missing: bool = False,
    seed: int = 0,
) -> np.ndarray:
    """Class probabilities (N, classes) for ``index``; ``modality_present`` (N, 3) defaults to the
    data's (pass a masked copy to hide modalities). With ``impute_missing`` the latents of absent
    modalities are inpainted by the latent diffusion model (deterministic for ``seed``).

    Raises:
        ValueError: ``modality_present`` is not (N, 3).
    """
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    index = np.asarray(index)
    present_all = data.arrays["modality_present"][index] if modality_present is None else modality_present
    if present_all.shape != (len(index), len(MODALITIES)):
        raise ValueError(f"modality_present must be ({len(index)}, {len(MODALITIES)}), got {present_all.shape}")
    chunks = []
    for start in range(0, len(index), batch_size):
        batch = to_batch(data, index[start : start + batch_size])
        present = torch.from_numpy(np.asarray(present_all[start : start + batch_size], dtype=bool))
        output = model(model_inputs(batch), present, impute_missing=impute_missing, generator=generator)
        chunks.append(torch.softmax(output.logits, dim=-1).numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, data.n_classes))


@torch.no_grad()
def encode_latent_stacks(
    model: MedDiffModel, data: ProcessedDataset, index: np.ndarray, batch_size: int = 64
) -> LatentStack:
    """The latent stacks (N, 1 + M, d) of ``index`` with every present modality in use; absent
    modalities have no latent (unknown channels)."""
    model.eval()
    index = np.asarray(index)
    stacks = []
    for start in range(0, len(index), batch_size):
        batch = to_batch(data, index[start : start + batch_size])
        output = model(model_inputs(batch), batch["modality_present"])
        stacks.append(LatentStack.build(output.modality_latents, batch["modality_present"], z=output.z))
    return LatentStack(torch.cat([s.values for s in stacks]), torch.cat([s.known for s in stacks]))


@torch.no_grad()
def encode_latents(model: MedDiffModel, data: ProcessedDataset, index: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Fused latents z (N, d) with every present modality in use."""
    model.eval()
    index = np.asarray(index)
    chunks = []
    for start in range(0, len(index), batch_size):
        batch = to_batch(data, index[start : start + batch_size])
        chunks.append(model(model_inputs(batch), batch["modality_present"]).z.numpy())
    return np.concatenate(chunks)
