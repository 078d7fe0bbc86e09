"""The processed-data contract between ``preprocess`` and every later stage.

``data/processed/`` holds:

* ``arrays.npz``: one row per patient, aligned across arrays (see :data:`ARRAY_SPEC`);
* ``meta.json``: class names, tabular feature names/units/scaler statistics, shapes, split counts;
* ``tokenizer.json``: the note tokenizer (Hugging Face ``tokenizers`` format), fitted on training notes.

``meta.json`` and ``tokenizer.json`` are the *preprocessing artefacts*: everything preprocess fitted
(tokenizer, tabular scaler statistics, class names, image parameters and channels, note length).
``train`` copies them into ``<model>/preprocessing/`` (:func:`copy_preprocessing_artefacts`), so a
registered model carries them and new data are preprocessed in *apply mode* without refitting
(``meddiff.data.preprocess.run_preprocess_apply``); apply mode puts every patient in split
:data:`APPLY_SPLIT` and an unknown diagnosis as :data:`UNKNOWN_LABEL`.

Only numpy is imported here, so readers stay cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from meddiff import MODALITIES
from meddiff.io import atomic_file, read_json, write_json

ARRAYS_FILE = "arrays.npz"
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS: tuple[str, ...] = ("train", "val", "test")
#: the split of every patient preprocessed in apply mode (new patients, an external drop)
APPLY_SPLIT = "predict"
#: ``label`` of a patient whose diagnosis is not known (an unlabelled drop of new patients)
UNKNOWN_LABEL = -1
#: sub-folder of a model folder holding the preprocessing artefacts it was trained with
PREPROCESSING_DIR = "preprocessing"
#: the files that make up the preprocessing artefacts
PREPROCESSING_FILES: tuple[str, ...] = (META_FILE, TOKENIZER_FILE)

#: name -> (dtype, shape description). N patients, D/H/W voxels, L note tokens, F tabular features.
ARRAY_SPEC: dict[str, tuple[str, str]] = {
    "patient_id": ("str", "(N,) pseudonymous patient id"),
    "label": ("int64", "(N,) index into meta['class_names'], UNKNOWN_LABEL (-1) when not known"),
    "split": ("str", "(N,) one of train/val/test, or APPLY_SPLIT (predict) in apply mode"),
    "site": ("str", "(N,) acquisition site"),
    "image": ("float16", "(N, C, D, H, W) channels in [0, 1] (meta['image_channels'], data.brain.IMAGE_CHANNELS), "
              "RAS, cropped around the brain"),
    "lesion_mask": ("uint8", "(N, 1, D, H, W) ground-truth lesion mask on the image's grid, 0 where none"),
    "has_lesion_mask": ("bool", "(N,) whether a ground-truth mask exists"),
    "token_ids": ("int32", "(N, L) note token ids, 0 = [PAD]"),
    "token_mask": ("bool", "(N, L) True for real tokens"),
    "tabular": ("float32", "(N, F) standardised with training-split statistics, imputed"),
    "tabular_missing": ("bool", "(N, F) True where the raw value was missing"),
    "modality_present": ("bool", "(N, 3) availability of image, text, tabular in the data"),
}
#: arrays a processed set may hold besides :data:`ARRAY_SPEC` (aligned on N when present)
OPTIONAL_ARRAY_SPEC: dict[str, tuple[str, str]] = {
    "lesion_contrast_hu": ("float32", "(N,) contrast of the masked lesion to the surrounding brain (HU, from the "
                           "cohort's lesion ledger), NaN without a lesion or a ledger"),
}


@dataclass
class ProcessedDataset:
    """All processed arrays plus metadata, as written by ``preprocess``."""

    arrays: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)
    vocabulary: dict[int, str] = field(default_factory=dict)  # token id → token, from tokenizer.json

    def __len__(self) -> int:
        return len(self.arrays["label"])

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def n_classes(self) -> int:
        return len(self.meta["class_names"])

    @property
    def n_tabular(self) -> int:
        return int(self.arrays["tabular"].shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def indices(self, split: str) -> np.ndarray:
        if split not in (*SPLITS, APPLY_SPLIT):
            raise ValueError(f"split must be one of {(*SPLITS, APPLY_SPLIT)}, got {split!r}")
        return np.flatnonzero(self.arrays["split"] == split)

    def subset(self, index: np.ndarray) -> ProcessedDataset:
        return ProcessedDataset({k: v[index] for k, v in self.arrays.items()}, self.meta, self.vocabulary)


def validate_arrays(arrays: dict[str, np.ndarray]) -> None:
    """Check that every array of the contract is present and aligned on the patient axis."""
    missing = sorted(set(ARRAY_SPEC) - set(arrays))
    if missing:
        raise ValueError(f"processed arrays are missing {missing}")
    n = len(arrays["label"])
    for name in [*ARRAY_SPEC, *(k for k in OPTIONAL_ARRAY_SPEC if k in arrays)]:
        if len(arrays[name]) != n:
            raise ValueError(f"array {name!r} has {len(arrays[name])} rows, expected {n}")
    if arrays["modality_present"].shape[1:] != (len(MODALITIES),):
        raise ValueError(f"modality_present must be (N, {len(MODALITIES)})")
    unknown = set(np.unique(arrays["split"]).tolist()) - {*SPLITS, APPLY_SPLIT}
    if unknown:
        raise ValueError(f"unknown split names {sorted(unknown)}")


def save_processed(directory: str | Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write ``arrays.npz`` and ``meta.json`` into ``directory`` (each file atomically)."""
    validate_arrays(arrays)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_file(directory / ARRAYS_FILE, "wb") as handle:
        np.savez(handle, **{k: np.asarray(v) for k, v in arrays.items()})
    write_json(directory / META_FILE, meta)


def load_processed(directory: str | Path) -> ProcessedDataset:
    """Read what ``preprocess`` wrote; errors name the missing file."""
    directory = Path(directory)
    arrays_path = directory / ARRAYS_FILE
    if not arrays_path.is_file():
        raise FileNotFoundError(f"{arrays_path}: not found; run `meddiff preprocess` first")
    with np.load(arrays_path, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    validate_arrays(arrays)
    return ProcessedDataset(arrays, read_json(directory / META_FILE), load_vocabulary(directory))


def load_vocabulary(directory: str | Path) -> dict[int, str]:
    """Token id → token string from ``tokenizer.json`` (empty when there is no tokenizer file)."""
    tokenizer_file = Path(directory) / TOKENIZER_FILE
    if not tokenizer_file.is_file():
        return {}
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    return {index: token for token, index in tokenizer.get_vocab().items()}



def copy_preprocessing_artefacts(processed_dir: str | Path, target_dir: str | Path) -> list[str]:
    """Copy the preprocessing artefacts (:data:`PREPROCESSING_FILES`) of ``processed_dir`` into
    ``target_dir`` (created); return the names copied. A processed set without notes' tokenizer (hand-made
    test data) has no ``tokenizer.json``: then only ``meta.json`` is copied, and apply mode will refuse it.

    Raises:
        FileNotFoundError: ``processed_dir`` has no ``meta.json``.
    """
    import shutil

    source, target = Path(processed_dir), Path(target_dir)
    if not (source / META_FILE).is_file():
        raise FileNotFoundError(f"{source / META_FILE}: not found; run `meddiff preprocess` first")
    target.mkdir(parents=True, exist_ok=True)
    copied = [name for name in PREPROCESSING_FILES if (source / name).is_file()]
    for name in copied:
        shutil.copyfile(source / name, target / name)
    return copied
