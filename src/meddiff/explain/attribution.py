"""What every attribution method returns, and the pieces they share (proposal §3.5).

An attribution explains one class per patient, the class the model predicts (argmax of the logits),
with all of the patient's present modalities as input. Every method gives, per patient:

* a voxel map over the image's spatial grid (D, H, W), non-negative, in the method's own units (its
  peak is kept, so that a map of a healthy patient can be compared with one of a lesion); the
  channels of a multi-channel image are summed;
* a relevance per note token (L,), zero on padding, and per EHR feature (F,), both non-negative;
* the relevance mass of each modality (image, text, EHR), normalised to shares that sum to 1. An
  absent modality has no influence on the model and gets no relevance at all.

The methods themselves live in one module each (``attention``, ``integrated_gradients``,
``grad_cam``, ``occlusion``); :func:`meddiff.explain.methods.explain_batch` dispatches to them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch

from meddiff import MODALITIES
from meddiff.model.multimodal import MedDiffModel

IMAGE, TEXT, TABULAR = (MODALITIES.index(m) for m in ("image", "text", "tabular"))


@dataclass
class Attributions:
    image: np.ndarray  # (B, D, H, W) ≥ 0, the method's units
    text: np.ndarray  # (B, L) ≥ 0, zero on padding and for an absent note
    tabular: np.ndarray  # (B, F) ≥ 0, zero for an absent EHR
    modality_share: np.ndarray  # (B, 3) relevance mass per modality; rows sum to 1 (0 where nothing is relevant)
    predicted: np.ndarray  # (B,) the class explained: the model's prediction
    probabilities: np.ndarray  # (B, classes) softmax of the model's logits

    @classmethod
    def concatenate(cls, parts: list[Attributions]) -> Attributions:
        """The attributions of several batches, in order.

        Raises:
            ValueError: no part.
        """
        if not parts:
            raise ValueError("no attributions to concatenate")
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)))


def modality_shares(mass: torch.Tensor, present: torch.Tensor) -> np.ndarray:
    """(B, 3) shares from per-modality relevance masses (B, 3): negative mass (evidence against the
    class) and absent modalities count 0; rows are normalised to sum 1 (all zero if nothing is relevant)."""
    mass = mass.detach().clamp_min(0.0) * present.float()
    return (mass / mass.sum(dim=1, keepdim=True).clamp_min(1e-12)).numpy()


def assemble(
    model: MedDiffModel,
    inputs: dict[str, torch.Tensor],
    present: torch.Tensor,
    image: torch.Tensor,
    text: torch.Tensor,
    tabular: torch.Tensor,
    mass: torch.Tensor,
) -> Attributions:
    """Attributions from a method's raw relevance: ``image`` (B, D, H, W), ``text`` (B, L), ``tabular``
    (B, F) (negative parts dropped; absent modalities and padding zeroed) and ``mass`` (B, 3)."""
    keep = present.float()
    with torch.no_grad():
        logits = model(inputs, present).logits
    return Attributions(
        image=(image.detach().clamp_min(0.0) * keep[:, IMAGE].view(-1, *[1] * (image.ndim - 1))).numpy(),
        text=(text.detach().clamp_min(0.0) * inputs["token_mask"].float() * keep[:, TEXT : TEXT + 1]).numpy(),
        tabular=(tabular.detach().clamp_min(0.0) * keep[:, TABULAR : TABULAR + 1]).numpy(),
        modality_share=modality_shares(mass, present),
        predicted=logits.argmax(dim=1).numpy(),
        probabilities=torch.softmax(logits, dim=-1).numpy(),
    )


def token_grid(n_tokens: int, spatial: tuple[int, ...], encoder: torch.nn.Module) -> tuple[int, ...]:
    """The (d, h, w) grid of the image encoder's region tokens: its ``grid`` attribute, else the grid
    that divides ``spatial`` by one common factor into ``n_tokens`` cells.

    Raises:
        ValueError: no such grid.
    """
    grid = getattr(encoder, "grid", None)
    if grid is not None and math.prod(grid) == n_tokens:
        return tuple(int(g) for g in grid)
    factor = round((math.prod(spatial) / n_tokens) ** (1.0 / len(spatial)))
    guess = tuple(side // max(factor, 1) for side in spatial)
    if math.prod(guess) != n_tokens:
        raise ValueError(f"cannot lay {n_tokens} image tokens on a grid over the image {spatial}")
    return guess


def mask_channels(model: MedDiffModel, n_channels: int) -> tuple[int, ...]:
    """Image channels that are masks, not densities (the brain mask channel of ``spec.image_brain_channel``):
    baselines, occlusion and deletion keep them, so "removing" a voxel means removing its density,
    not moving the brain's outline."""
    channel = getattr(getattr(model, "spec", None), "image_brain_channel", None)
    return () if channel is None else (channel % n_channels,)


def density_baseline(image: torch.Tensor, keep: tuple[int, ...]) -> torch.Tensor:
    """``image`` (B, C, D, H, W) with every channel but ``keep`` set to 0 (the value outside the brain)."""
    baseline = torch.zeros_like(image)
    for channel in keep:
        baseline[:, channel] = image[:, channel]
    return baseline


def predicted_probability(logits: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """(B,) softmax probability of each row's ``predicted`` class (the explained output)."""
    return torch.softmax(logits, dim=-1).gather(1, predicted.view(-1, 1)).squeeze(1)
