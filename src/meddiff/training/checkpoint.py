"""Model checkpoints: weights as a plain state dict (loaded with ``weights_only=True``, never an
arbitrary pickle) and the :class:`ModelSpec` as JSON beside them. Written atomically."""

from __future__ import annotations

from pathlib import Path

import torch

from meddiff.io import atomic_file, read_json, write_json
from meddiff.model.multimodal import MedDiffModel, ModelSpec

WEIGHTS_FILE = "model.pt"
SPEC_FILE = "model_spec.json"


def save_model(model: MedDiffModel, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_file(directory / WEIGHTS_FILE, "wb") as handle:
        torch.save(model.state_dict(), handle)
    write_json(directory / SPEC_FILE, model.spec.to_dict())
    return directory / WEIGHTS_FILE


def load_model(directory: str | Path, device: torch.device | str = "cpu") -> MedDiffModel:
    directory = Path(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: no trained model; run `meddiff train` first")
    model = MedDiffModel(ModelSpec.from_dict(read_json(directory / SPEC_FILE)))
    model.load_state_dict(torch.load(weights, map_location=device, weights_only=True))
    return model.to(device).eval()


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
