"""Deletion curves (Petsiuk, Das & Saenko 2018, "RISE", deletion metric): remove a modality's elements
in the order a map ranks them and follow the probability of the explained class; a faithful map makes
it fall faster than removing the same number of random elements.

Steps are fractions of the modality's elements (``explain.deletion_fractions``, starting at 0):

* image: the top-ranked voxels of the whole volume, set to 0 in every density channel (a brain mask
  channel is kept); the counts are
  fractions of the support (brain or head) and the random order is drawn inside the support, so that a
  map pointing outside the brain is not rewarded for deleting voxels that carry nothing;
* note: the top-ranked real tokens removed (mask off, id [PAD]);
* EHR: the top-ranked present features marked missing.

The area under a curve is the mean over equally weighted steps (trapezoids in the step index),
in probability units; lower is more faithful. ``random − method`` > 0 says the map beats chance. All
maps of a patient are compared with the same random order, deleted in the same forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from meddiff import MODALITIES
from meddiff.explain.attribution import density_baseline, mask_channels, predicted_probability
from meddiff.model.multimodal import MedDiffModel

#: The name of the random deletion order in the curves.
RANDOM = "random"


def curve_area(curve: np.ndarray) -> np.ndarray:
    """Area under curves (..., S) over S equally spaced steps on [0, 1]."""
    curve = np.asarray(curve, dtype=float)
    return (curve[..., 1:] + curve[..., :-1]).sum(axis=-1) / (2.0 * (curve.shape[-1] - 1))


def deletion_counts(n_elements: int, fractions: list[float]) -> list[int]:
    """How many of ``n_elements`` are deleted at each step (rounded up, so the first step > 0 deletes one)."""
    return [min(n_elements, math.ceil(f * n_elements - 1e-9)) for f in fractions]


def _orders(
    modality: str, single: dict[str, torch.Tensor], rankings: list[np.ndarray], support: np.ndarray,
    rng: np.random.Generator,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Deletion orders (element indices, most relevant first) of each ranking and of a random order,
    and the elements that may be deleted (the support's voxels, the real tokens or the present features)."""
    if modality == "image":
        candidates = np.flatnonzero(support.ravel())
        ordered = [np.argsort(-ranking.ravel(), kind="stable") for ranking in rankings]
    else:
        real = single["token_mask"][0] if modality == "text" else ~single["tabular_missing"][0]
        candidates = np.flatnonzero(real.numpy())
        ordered = [candidates[np.argsort(-ranking[candidates], kind="stable")] for ranking in rankings]
    return [*ordered, rng.permutation(candidates)], candidates


def patient_curves(
    model: MedDiffModel,
    inputs: dict[str, torch.Tensor],
    present: torch.Tensor,
    row: int,
    relevance: Mapping[str, Mapping[str, np.ndarray]],
    predicted: int,
    support: np.ndarray,
    fractions: list[float],
    rng: np.random.Generator,
) -> dict[str, dict[str, np.ndarray]]:
    """Deletion curves of patient ``row`` of the batch ``inputs``: ``{map: {modality: (S,) probabilities of
    the class predicted}}`` for every map of ``relevance`` and for :data:`RANDOM` (one random order shared
    by all maps), over the present modalities. ``relevance[map]`` holds the patient's map (D, H, W) under
    ``image``, token relevance (L,) under ``text`` and feature relevance (F,) under ``tabular``;
    ``support`` (D, H, W) is where the random order draws voxels and what the image fractions count."""
    single = {name: value[row : row + 1] for name, value in inputs.items()}
    names = [*relevance, RANDOM]
    curves: dict[str, dict[str, np.ndarray]] = {name: {} for name in names}
    steps = len(fractions)
    for modality in MODALITIES:
        if not bool(present[row, MODALITIES.index(modality)]):
            continue
        orders, candidates = _orders(modality, single, [relevance[n][modality] for n in relevance], support, rng)
        if candidates.size == 0:
            continue
        counts = deletion_counts(candidates.size, fractions)
        width = single["image"][0, 0].numel() if modality == "image" else relevance[names[0]][modality].size
        deleted = np.zeros((len(orders) * steps, width), bool)
        for k, order in enumerate(orders):
            for step, count in enumerate(counts):
                deleted[k * steps + step, order[:count]] = True
        removed = torch.from_numpy(deleted)
        batch = {name: value.repeat(len(deleted), *[1] * (value.ndim - 1)) for name, value in single.items()}
        if modality == "image":
            where = removed.view(len(deleted), 1, *single["image"].shape[2:])
            emptied = density_baseline(batch["image"], mask_channels(model, batch["image"].shape[1]))
            batch["image"] = torch.where(where, emptied, batch["image"])
        elif modality == "text":
            batch["token_mask"] = batch["token_mask"] & ~removed
            batch["token_ids"] = batch["token_ids"].masked_fill(removed, 0)
        else:
            batch["tabular_missing"] = batch["tabular_missing"] | removed
        with torch.no_grad():
            logits = model(batch, present[row : row + 1].expand(len(deleted), -1)).logits
        probability = predicted_probability(logits, torch.full((len(deleted),), predicted)).numpy()
        for k, name in enumerate(names):
            curves[name][modality] = probability[k * steps : (k + 1) * steps]
    return curves
