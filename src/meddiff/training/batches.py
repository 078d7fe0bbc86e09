"""Mini-batches of the processed arrays as tensors (the whole processed set fits in memory)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from meddiff.data.dataset import ProcessedDataset

MODEL_INPUTS: tuple[str, ...] = ("image", "token_ids", "token_mask", "tabular", "tabular_missing")


def to_batch(data: ProcessedDataset, index: np.ndarray, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Tensors for the patients in ``index``: model inputs, ``label`` and ``present`` (B, 3)."""
    arrays = data.arrays
    batch = {
        "image": torch.from_numpy(arrays["image"][index].astype(np.float32)),
        "token_ids": torch.from_numpy(arrays["token_ids"][index].astype(np.int64)),
        "token_mask": torch.from_numpy(arrays["token_mask"][index].astype(bool)),
        "tabular": torch.from_numpy(arrays["tabular"][index].astype(np.float32)),
        "tabular_missing": torch.from_numpy(arrays["tabular_missing"][index].astype(bool)),
        "label": torch.from_numpy(arrays["label"][index].astype(np.int64)),
        "present": torch.from_numpy(arrays["modality_present"][index].astype(bool)),
    }
    return {name: tensor.to(device) for name, tensor in batch.items()}


def iterate_batches(
    data: ProcessedDataset,
    index: np.ndarray,
    batch_size: int,
    shuffle: bool,
    rng: np.random.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Iterator[dict[str, torch.Tensor]]:
    order = rng.permutation(index) if shuffle and rng is not None else np.asarray(index)
    for start in range(0, len(order), batch_size):
        yield to_batch(data, order[start : start + batch_size], device)
