"""The resumable training state: weights, optimiser, schedule, RNG states and the loop's position,
saved as tensors, numbers, strings, lists and dicts only (loaded with ``weights_only=True``, never an
arbitrary pickle), written atomically. The trained model itself saves and loads itself
(:meth:`meddiff.model.multimodal.MedDiffModel.save_pretrained`)."""

from __future__ import annotations

from pathlib import Path

import torch

from meddiff.io import atomic_file


def save_training_state(path: str | Path, state: dict) -> None:
    """Write a resumable training state (tensors, numbers, strings, lists, dicts only), atomically."""
    with atomic_file(path, "wb") as handle:
        torch.save(state, handle)


def load_training_state(path: str | Path) -> dict | None:
    """The saved training state, or ``None`` when there is none to resume from."""
    path = Path(path)
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)
