"""Stochastic modality masking (proposal §3.3, adaptive training).

Each modality a patient has is masked independently with probability ``p``; when that would mask
every modality of a patient, one of its present modalities is kept at random, so the model always
sees at least one. The same function drives the evaluation sweep over masking rates.
"""

from __future__ import annotations

import torch


def sample_modality_mask(
    present: torch.Tensor, p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Return ``used`` (B, M): present and not masked, with at least one True per row.

    Args:
        present: (B, M) bool, modalities available in the data (each row has at least one).
        p: probability of masking each present modality, in [0, 1).
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"masking probability must be in [0, 1), got {p}")
    if not bool(present.any(dim=1).all()):
        raise ValueError("every patient needs at least one present modality")
    if p == 0.0:
        return present.clone()
    keep = torch.rand(present.shape, generator=generator) >= p
    used = present & keep.to(present.device)
    empty = ~used.any(dim=1)
    if bool(empty.any()):
        # Choose one present modality per emptied row, uniformly.
        scores = torch.rand(present.shape, generator=generator).to(present.device)
        scores = scores.masked_fill(~present, -1.0)
        rescue = torch.nn.functional.one_hot(scores.argmax(dim=1), present.shape[1]).bool()
        used = torch.where(empty.unsqueeze(1), rescue, used)
    return used
