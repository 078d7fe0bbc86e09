"""The data → model adapter: processed arrays as mini-batches of tensors. A batch gathers its patients'
rows only: the volumes of a loaded set are :class:`meddiff.data.dataset.ShardedArray`, read from the shard
files on indexing, so an epoch's memory is one batch, whatever the cohort's size.

A batch is a dict of tensors keyed by the processed-data array names (:data:`BATCH_DTYPES`): the
model inputs (:data:`MODEL_INPUTS`), ``label`` and ``modality_present`` (B, 3); a training batch of the
segmentation loss also has the lesion masks (:data:`LESION_TARGETS`). The same conversion serves raw
inputs at serving time (:func:`to_tensors`, used by the MLflow pyfunc).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import numpy.typing as npt
import torch

from meddiff.data.dataset import ProcessedDataset

#: The inputs of ``MedDiffModel.forward``'s batch, in the order the MLflow input example lists them.
MODEL_INPUTS: tuple[str, ...] = ("image", "token_ids", "token_mask", "tabular", "tabular_missing")

#: Tensor dtype of each batch entry; the processed arrays are stored smaller (e.g. the image as float16).
BATCH_DTYPES: dict[str, type] = {
    "image": np.float32,
    "token_ids": np.int64,
    "token_mask": bool,
    "tabular": np.float32,
    "tabular_missing": bool,
    "label": np.int64,
    "modality_present": bool,
}

#: The lesion masks as training targets (the auxiliary segmentation loss): read only when asked, so that
#: inference never reads a mask.
LESION_TARGETS: dict[str, type] = {
    "lesion_mask": np.float32,  # (B, 1, D, H, W), 1 inside the lesion
    "has_lesion_mask": bool,  # (B,) whether the patient has a ground-truth mask (an empty mask is one)
}


def to_tensors(arrays: Mapping[str, npt.ArrayLike], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Each array of ``arrays`` (keys of :data:`BATCH_DTYPES`) as a tensor of its batch dtype.

    Raises:
        KeyError: a name that is not a batch entry.
    """
    dtypes = BATCH_DTYPES | LESION_TARGETS
    unknown = set(arrays) - set(dtypes)
    if unknown:
        raise KeyError(f"not batch entries: {sorted(unknown)}; known: {list(dtypes)}")
    return {
        name: torch.from_numpy(np.array(values, dtype=dtypes[name])).to(device)
        for name, values in arrays.items()
    }


def to_batch(
    data: ProcessedDataset, index: np.ndarray, device: torch.device | str = "cpu", lesion_masks: bool = False
) -> dict[str, torch.Tensor]:
    """Tensors for the patients in ``index``: the model inputs, ``label`` and ``modality_present`` (B, 3), and
    with ``lesion_masks`` the :data:`LESION_TARGETS`; only these patients' rows are read."""
    names = list(BATCH_DTYPES) + (list(LESION_TARGETS) if lesion_masks else [])
    return to_tensors({name: data.arrays[name][index] for name in names}, device)


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of ``batch`` that ``MedDiffModel.forward`` reads (:data:`MODEL_INPUTS`)."""
    return {name: batch[name] for name in MODEL_INPUTS}


def iterate_batches(
    data: ProcessedDataset,
    index: np.ndarray,
    batch_size: int,
    shuffle: bool,
    rng: np.random.Generator | None = None,
    device: torch.device | str = "cpu",
    lesion_masks: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of at most ``batch_size`` patients of ``index``, in order or shuffled by ``rng`` (with
    ``lesion_masks``, their masks too: :func:`to_batch`)."""
    order = rng.permutation(index) if shuffle and rng is not None else np.asarray(index)
    for start in range(0, len(order), batch_size):
        yield to_batch(data, order[start : start + batch_size], device, lesion_masks)
