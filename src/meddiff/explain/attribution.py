"""Attention-based attributions (proposal §3.5), read from the weights the model used.

* Image: the fusion attention α_ij from the modality queries to the image region tokens (mean over
  heads and queries), laid back on the encoder's voxel grid and upsampled trilinearly to the input
  volume. Thresholded at a quantile, it is compared with the lesion mask by the Dice coefficient
  (proposal §3.6, explainability metric).
* Text: attention rollout (Abnar & Zuidema 2020): R = Π_l (½·Ā_l + ½·I), rows renormalised, with Ā_l
  the head-averaged self-attention of layer l; the fusion attention on the note's output tokens is
  propagated through R to the input tokens.
* Tabular: the fusion attention on each EHR feature token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from meddiff.model.multimodal import ModelOutput


@dataclass
class Attributions:
    image: np.ndarray  # (B, D, H, W) in [0, 1]
    text: np.ndarray  # (B, L), zero on padding
    tabular: np.ndarray  # (B, F)
    modality_share: np.ndarray  # (B, 3) attention mass per modality


def attention_rollout(attentions: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Rollout matrix (B, L, L) from per-layer attentions [(B, heads, L, L), ...]."""
    rollout = None
    for layer in attentions:
        mean = layer.mean(dim=1)
        identity = torch.eye(mean.shape[-1], device=mean.device).expand_as(mean)
        step = 0.5 * mean + 0.5 * identity
        step = step / step.sum(dim=-1, keepdim=True)
        rollout = step if rollout is None else step @ rollout
    if rollout is None:
        raise ValueError("attention rollout needs at least one layer")
    return rollout


def _normalise(values: torch.Tensor) -> torch.Tensor:
    flat = values.flatten(1)
    low, high = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(1e-12)).view_as(values)


def compute_attributions(
    output: ModelOutput, grid: tuple[int, int, int], spatial_size: tuple[int, int, int], token_mask: torch.Tensor
) -> Attributions:
    attention = output.attention.mean(dim=(1, 2))  # (B, T): mean over heads and modality queries
    slices = output.token_slices
    image_tokens = attention[:, slices["image"]].reshape(-1, 1, *grid)
    image = F.interpolate(image_tokens, size=spatial_size, mode="trilinear", align_corners=False)[:, 0]
    text = attention[:, slices["text"]]
    if output.text_attentions:
        text = (text.unsqueeze(1) @ attention_rollout(output.text_attentions)).squeeze(1)
    text = text * token_mask
    share = torch.stack([attention[:, s].sum(dim=1) for s in slices.values()], dim=1)
    return Attributions(
        image=_normalise(image).numpy(),
        text=text.numpy(),
        tabular=attention[:, slices["tabular"]].numpy(),
        modality_share=share.numpy(),
    )


def dice(prediction: np.ndarray, target: np.ndarray) -> float:
    """Dice = 2|P ∩ T| / (|P| + |T|); 1.0 when both are empty."""
    prediction, target = prediction.astype(bool), target.astype(bool)
    total = prediction.sum() + target.sum()
    return 1.0 if total == 0 else float(2.0 * (prediction & target).sum() / total)


def attribution_mask(attribution: np.ndarray, quantile: float) -> np.ndarray:
    return attribution >= np.quantile(attribution, quantile)
