"""Attention-based attributions (proposal §3.5), read from the weights the model used.

Token relevance comes from the fusion attention α_ij (modality queries i → key tokens j), by one of:

* ``attention``: α averaged over heads and queries (what the proposal names directly);
* ``grad_attention``: gradient-weighted attention, R_j = Σ_i E_h[(∂y_c/∂α_ij ⊙ α_ij)⁺] for the
  predicted class c (Chefer, Gur & Wolf 2021, "Generic attention-model explainability", eq. 5 for
  one attention layer). Raw attention also routes information the decision does not use;
  weighting by the gradient keeps the part that raises the predicted class.

Per modality:

* Image: relevance of the region tokens, laid back on the encoder's voxel grid and upsampled
  trilinearly to the input volume; thresholded at a fraction of its maximum it is compared with the
  lesion mask by the Dice coefficient (proposal §3.6), and its maximum by the pointing game (Zhang et
  al. 2018: does the most relevant voxel fall in the lesion?).
* Text: attention rollout (Abnar & Zuidema 2020), R = Π_l (½·Ā_l + ½·I) with rows renormalised and
  Ā_l the head-averaged self-attention of layer l; the fusion relevance of the note's output tokens
  is propagated through R to the input tokens.
* Tabular: the fusion relevance of each EHR feature token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from meddiff.model.multimodal import MedDiffModel, ModelOutput

Method = Literal["attention", "grad_attention"]


@dataclass
class Attributions:
    image: np.ndarray  # (B, D, H, W) in [0, 1]
    text: np.ndarray  # (B, L), zero on padding
    tabular: np.ndarray  # (B, F)
    modality_share: np.ndarray  # (B, 3) relevance mass per modality, rows sum to 1
    predicted: np.ndarray  # (B,) class the attributions explain
    probabilities: np.ndarray  # (B, classes)


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


def token_relevance(output: ModelOutput, method: Method) -> torch.Tensor:
    """(B, T) relevance of each fusion key token."""
    if method == "attention":
        return output.attention.detach().mean(dim=(1, 2))
    if output.attention.grad is None:
        raise ValueError("grad_attention needs the gradient of the explained logit w.r.t. the attention")
    weighted = (output.attention.grad * output.attention.detach()).clamp_min(0.0)  # (B, heads, M, T)
    return weighted.mean(dim=1).sum(dim=1)


def explain_batch(
    model: MedDiffModel,
    inputs: dict[str, torch.Tensor],
    modality_present: torch.Tensor,
    method: Method,
) -> Attributions:
    """Forward (with attentions), backpropagate the predicted logit, and read the relevance of the
    patients' ``inputs`` with ``modality_present`` (B, 3); an absent modality gets no relevance."""
    model.eval()
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        output = model(inputs, modality_present, output_attentions=True)
        output.attention.retain_grad()
        predicted = output.logits.argmax(dim=1)
        output.logits.gather(1, predicted.unsqueeze(1)).sum().backward()
    relevance = token_relevance(output, method)
    slices = output.token_slices
    grid = model.image_encoder.grid
    spatial = tuple(inputs["image"].shape[2:])
    image_tokens = relevance[:, slices["image"]].reshape(-1, 1, *grid)
    image = F.interpolate(image_tokens, size=spatial, mode="trilinear", align_corners=False)[:, 0]
    text = relevance[:, slices["text"]]
    if output.text_attentions:
        rollout = attention_rollout(tuple(a.detach() for a in output.text_attentions))
        text = (text.unsqueeze(1) @ rollout).squeeze(1)
    text = text * inputs["token_mask"].float()
    share = torch.stack([relevance[:, s].sum(dim=1) for s in slices.values()], dim=1)
    share = share / share.sum(dim=1, keepdim=True).clamp_min(1e-12)
    model.zero_grad(set_to_none=True)
    return Attributions(
        image=_normalise(image).numpy(),
        text=text.numpy(),
        tabular=relevance[:, slices["tabular"]].numpy(),
        modality_share=share.numpy(),
        predicted=predicted.numpy(),
        probabilities=torch.softmax(output.logits.detach(), dim=-1).numpy(),
    )


def dice(prediction: np.ndarray, target: np.ndarray) -> float:
    """Dice = 2|P ∩ T| / (|P| + |T|); 1.0 when both are empty."""
    prediction, target = prediction.astype(bool), target.astype(bool)
    total = prediction.sum() + target.sum()
    return 1.0 if total == 0 else float(2.0 * (prediction & target).sum() / total)


def attribution_mask(attribution: np.ndarray, threshold: float) -> np.ndarray:
    """Voxels whose (max-normalised) relevance is at least ``threshold``."""
    return attribution >= threshold * attribution.max()


def pointing_hit(attribution: np.ndarray, lesion: np.ndarray, tolerance_voxels: int = 1) -> bool:
    """Whether the most relevant voxel lies in the lesion (dilated by ``tolerance_voxels``)."""
    from scipy.ndimage import binary_dilation

    region = binary_dilation(lesion.astype(bool), iterations=tolerance_voxels) if tolerance_voxels else lesion
    return bool(region[np.unravel_index(int(np.argmax(attribution)), attribution.shape)])
