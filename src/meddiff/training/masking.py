"""Stochastic modality masking (proposal §3.3, adaptive training).

Each modality a patient has is masked independently with probability ``p``; when that would mask
every modality of a patient, one of its present modalities is kept at random, so the model always
sees at least one. A masked modality is presented to the model as absent: every function here maps a
``modality_present`` mask (B, M) to a smaller one. The evaluation sweep masks with the same functions.
"""

from __future__ import annotations

import torch


def sample_modality_mask(
    present: torch.Tensor, p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Return the presence after masking (B, M): present and not masked, at least one True per row.

    Args:
        present: (B, M) bool, modalities available (a row with none stays empty).
        p: probability of masking each present modality, in [0, 1).
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"masking probability must be in [0, 1), got {p}")
    if p == 0.0:
        return present.clone()
    unmasked = torch.rand(present.shape, generator=generator) >= p
    kept = present & unmasked.to(present.device)
    empty = ~kept.any(dim=1) & present.any(dim=1)
    if bool(empty.any()):
        # Choose one present modality per emptied row, uniformly.
        scores = torch.rand(present.shape, generator=generator).to(present.device)
        scores = scores.masked_fill(~present, -1.0)
        rescue = torch.nn.functional.one_hot(scores.argmax(dim=1), present.shape[1]).bool()
        kept = torch.where(empty.unsqueeze(1), rescue, kept)
    return kept


def mask_exact_fraction(
    present: torch.Tensor, fraction: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Mask exactly ``round(fraction · S)`` of the S present (patient, modality) slots, chosen
    uniformly at random, while every patient keeps at least one modality.

    When the fraction asks for more than that allows (S − patients slots at most, e.g. above 2/3 when
    everyone has all three modalities), every maskable slot is masked; the caller reports the
    fraction actually reached.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    kept = present.clone()
    slots = torch.nonzero(present, as_tuple=False)  # (S, 2) rows of (patient, modality)
    target = round(fraction * len(slots))
    remaining = present.sum(dim=1)
    masked = 0
    for slot in torch.randperm(len(slots), generator=generator).tolist():
        if masked >= target:
            break
        patient, modality = slots[slot].tolist()
        if remaining[patient] > 1:
            kept[patient, modality] = False
            remaining[patient] -= 1
            masked += 1
    return kept


def drop_modality(present: torch.Tensor, modality: int) -> torch.Tensor:
    """Remove one modality from every patient that has another one left (patients with only that
    modality keep it: nothing else could be predicted from)."""
    kept = present.clone()
    has_other = (present.sum(dim=1) - present[:, modality].long()) > 0
    kept[has_other, modality] = False
    return kept
