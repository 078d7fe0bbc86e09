"""What is compared between the training data and a new drop: one table of per-patient statistics per
feature group, computed from the processed-data contract (:mod:`meddiff.data.dataset`).

Groups (a patient appears in a group only when it has that modality; a group with no patient is empty):

* ``ehr``: the tabular features in their canonical units (labs, age, sex), the standardisation undone
  with the training statistics in ``meta.json``; a missing value is NaN, never the imputed median;
* ``note``: note length in tokens (without ``[CLS]``/``[SEP]``/padding) and the share of ``[UNK]``
  tokens (words the fitted vocabulary has never seen: new templates, another language, typos);
* ``image``: per density channel of :data:`meddiff.data.brain.IMAGE_CHANNELS` the mean and standard
  deviation inside the brain mask, and the brain's share of the crop (scanner calibration, noise,
  field of view and segmentation failures all move these);
* ``latent``: the trained encoders' latent of each present modality projected on its leading principal
  components, fitted on the reference patients (``latent_<modality>_pc<k>``): drift the model itself sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from meddiff import MODALITIES
from meddiff.data.brain import BRAIN_MASK_CHANNEL, IMAGE_CHANNELS
from meddiff.data.dataset import ProcessedDataset
from meddiff.data.tokenizer import SPECIAL_TOKENS, UNK

#: feature groups in report order
GROUPS: tuple[str, ...] = ("ehr", "note", "image", "latent")
_IMAGE_INDEX, _TEXT_INDEX, _TABULAR_INDEX = (MODALITIES.index(m) for m in ("image", "text", "tabular"))
#: brain-mask channel value above which a voxel is brain
_BRAIN_THRESHOLD = 0.5


def ehr_features(data: ProcessedDataset, index: np.ndarray) -> pd.DataFrame:
    """(n with EHR, features) canonical-unit values; NaN where the value was missing.

    Raises:
        ValueError: ``meta.json`` lacks the ``tabular_features`` statistics of preprocessing.
    """
    described = data.meta.get("tabular_features")
    if not described:
        raise ValueError("processed meta.json has no 'tabular_features': cannot undo the standardisation")
    index = index[data.arrays["modality_present"][index, _TABULAR_INDEX]]
    mean = np.array([f["mean"] for f in described])
    std = np.array([f["std"] for f in described])
    values = data.arrays["tabular"][index].astype(float) * std + mean
    values[data.arrays["tabular_missing"][index]] = np.nan
    return pd.DataFrame(values, columns=[f["name"] for f in described])


def note_features(data: ProcessedDataset, index: np.ndarray) -> pd.DataFrame:
    """(n with a note, 2): ``note_tokens`` and ``unknown_token_share``."""
    index = index[data.arrays["modality_present"][index, _TEXT_INDEX]]
    ids = data.arrays["token_ids"][index]
    # preprocess records the ids; special tokens take ids 0.. in SPECIAL_TOKENS order otherwise (tokenizer)
    special = data.meta.get("special_tokens") or {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    words = data.arrays["token_mask"][index].astype(bool) & ~np.isin(ids, [special[t] for t in SPECIAL_TOKENS
                                                                            if t != UNK])
    n_words = words.sum(axis=1)
    unknown = (words & (ids == special[UNK])).sum(axis=1)
    return pd.DataFrame({
        "note_tokens": n_words.astype(float),
        "unknown_token_share": np.divide(unknown, n_words, out=np.zeros(len(index)), where=n_words > 0),
    })


def image_features(data: ProcessedDataset, index: np.ndarray) -> pd.DataFrame:
    """(n with an image, ·): per channel of ``meta['image_channels']`` the mean and std inside the brain
    mask channel, and ``brain_share``; without a brain-mask channel, over the whole crop."""
    index = index[data.arrays["modality_present"][index, _IMAGE_INDEX]]
    n_channels = data.arrays["image"].shape[1]
    names = list(data.meta.get("image_channels", IMAGE_CHANNELS if n_channels == len(IMAGE_CHANNELS)
                                 else [f"channel{c}" for c in range(n_channels)]))
    mask_name = IMAGE_CHANNELS[BRAIN_MASK_CHANNEL]
    mask_channel = names.index(mask_name) if mask_name in names else None
    columns: dict[str, list[float]] = {"brain_share": []} if mask_channel is not None else {}
    for name in names:
        if name != mask_name:
            columns[f"{name}_mean"], columns[f"{name}_std"] = [], []
    for i in index:  # one volume at a time: a float32 copy of all images would not fit for large drops
        volume = data.arrays["image"][i].astype(np.float32)
        brain = volume[mask_channel] > _BRAIN_THRESHOLD if mask_channel is not None else np.ones(volume.shape[1:], bool)
        if mask_channel is not None:
            columns["brain_share"].append(float(brain.mean()))
        for c, name in enumerate(names):
            if c == mask_channel:
                continue
            inside = volume[c][brain]
            columns[f"{name}_mean"].append(float(inside.mean()) if inside.size else np.nan)
            columns[f"{name}_std"].append(float(inside.std()) if inside.size else np.nan)
    return pd.DataFrame(columns)


@dataclass(frozen=True)
class LatentProjection:
    """Principal axes of each modality's latent on the reference patients (``components`` (k, d))."""

    mean: dict[str, np.ndarray]
    components: dict[str, np.ndarray]

    @classmethod
    def fit(cls, latents: np.ndarray, present: np.ndarray, n_components: int) -> LatentProjection:
        """``latents`` (N, M, d), ``present`` (N, M); modalities no reference patient has are left out."""
        means, axes = {}, {}
        for m, name in enumerate(MODALITIES):
            rows = latents[present[:, m], m]
            if len(rows) < 2:
                continue
            centred = rows - rows.mean(axis=0)
            _, _, vt = np.linalg.svd(centred, full_matrices=False)
            means[name], axes[name] = rows.mean(axis=0), vt[: min(n_components, len(vt))]
        return cls(means, axes)

    def transform(self, latents: np.ndarray, present: np.ndarray) -> pd.DataFrame:
        """One row per patient, ``latent_<modality>_pc<k>``; NaN where the modality is absent."""
        columns = {}
        for m, name in enumerate(MODALITIES):
            if name not in self.components:
                continue
            scores = (latents[:, m] - self.mean[name]) @ self.components[name].T
            scores[~present[:, m]] = np.nan
            for k in range(scores.shape[1]):
                columns[f"latent_{name}_pc{k + 1}"] = scores[:, k]
        return pd.DataFrame(columns)
