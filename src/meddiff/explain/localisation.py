"""Does an attribution map find the lesion? Every map (each method's, a random map, a centre-of-the-brain
prior) is scored the same way against the lesion mask (proposal §3.6, target Dice > 0.7):

* pointing game (Zhang et al. 2018): is the map's peak in the lesion, dilated by ``tolerance`` voxels?
* Dice and IoU of three binarisations of the map: voxels ≥ a fixed ``fraction`` of its maximum;
  voxels above Otsu's threshold (Otsu 1979) of the map's values inside the head; and the top-k voxels
  with k the lesion's size (no threshold to choose; Dice then equals precision and recall).

A map with no positive value finds nothing: empty masks, no hit.

The *support* is where a lesion can be: the brain mask when the image has one as a channel (or the
processed data as ``brain_mask``), else the head (voxels where any image channel is above 0). The priors live in it;
the methods' maps are scored as they are, wherever they point.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_dilation

#: Histogram bins for Otsu's threshold.
OTSU_BINS = 64
#: Per-patient scores, in report order.
SCORES = ("pointing", "dice_fraction", "iou_fraction", "dice_otsu", "iou_otsu", "dice_topk", "iou_topk")
#: The processed array with each patient's brain mask, when preprocessing writes one.
BRAIN_MASK = "brain_mask"
#: A brain mask channel marks the brain with values above this (as the image encoder reads it).
BRAIN_CHANNEL_THRESHOLD = 0.5


def dice(prediction: np.ndarray, target: np.ndarray) -> float:
    """Dice = 2|P ∩ T| / (|P| + |T|); 1.0 when both are empty."""
    prediction, target = prediction.astype(bool), target.astype(bool)
    total = prediction.sum() + target.sum()
    return 1.0 if total == 0 else float(2.0 * (prediction & target).sum() / total)


def iou(prediction: np.ndarray, target: np.ndarray) -> float:
    """Intersection over union |P ∩ T| / |P ∪ T|; 1.0 when both are empty."""
    prediction, target = prediction.astype(bool), target.astype(bool)
    union = (prediction | target).sum()
    return 1.0 if union == 0 else float((prediction & target).sum() / union)


def otsu_threshold(values: np.ndarray, bins: int = OTSU_BINS) -> float:
    """Otsu's threshold: the histogram cut that maximises the between-class variance of ``values``.
    Constant values have no cut: their value is returned (so that ``values > threshold`` is empty)."""
    values = np.asarray(values, dtype=float).ravel()
    if values.size == 0 or values.min() == values.max():
        return float(values.max()) if values.size else 0.0
    counts, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    below = np.cumsum(counts)[:-1]
    above = counts.sum() - below
    mass_below = np.cumsum(counts * centres)[:-1]
    mean_below = mass_below / np.maximum(below, 1)
    mean_above = ((counts * centres).sum() - mass_below) / np.maximum(above, 1)
    between = below * above * (mean_below - mean_above) ** 2
    return float(edges[1:-1][np.argmax(between)])


def fraction_mask(attribution: np.ndarray, fraction: float) -> np.ndarray:
    """Voxels whose relevance is ≥ ``fraction`` of the map's (positive) maximum."""
    peak = attribution.max()
    return attribution >= fraction * peak if peak > 0 else np.zeros(attribution.shape, bool)


def otsu_mask(attribution: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Voxels above Otsu's threshold of the map's values inside ``support``."""
    if attribution.max() <= 0:
        return np.zeros(attribution.shape, bool)
    return attribution > otsu_threshold(attribution[support.astype(bool)])


def top_k_mask(attribution: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` most relevant voxels (ties in index order); only voxels with positive relevance."""
    flat = attribution.ravel()
    order = np.argsort(-flat, kind="stable")[:k]
    mask = np.zeros(flat.shape, bool)
    mask[order[flat[order] > 0]] = True
    return mask.reshape(attribution.shape)


def pointing_hit(attribution: np.ndarray, lesion: np.ndarray, tolerance_voxels: int = 1) -> bool:
    """Whether the most relevant voxel lies in the lesion (dilated by ``tolerance_voxels``); a map with no
    positive value points nowhere."""
    if attribution.max() <= 0:
        return False
    region = binary_dilation(lesion.astype(bool), iterations=tolerance_voxels) if tolerance_voxels else lesion
    return bool(region[np.unravel_index(int(np.argmax(attribution)), attribution.shape)])


def score_map(
    attribution: np.ndarray, lesion: np.ndarray, support: np.ndarray, fraction: float, tolerance_voxels: int
) -> dict[str, float]:
    """The :data:`SCORES` of one map (D, H, W) against one lesion mask, plus the masks' sizes."""
    lesion = lesion.astype(bool)
    masks = {
        "fraction": fraction_mask(attribution, fraction),
        "otsu": otsu_mask(attribution, support),
        "topk": top_k_mask(attribution, int(lesion.sum())),
    }
    scores: dict[str, float] = {"pointing": float(pointing_hit(attribution, lesion, tolerance_voxels))}
    for name, mask in masks.items():
        scores[f"dice_{name}"] = dice(mask, lesion)
        scores[f"iou_{name}"] = iou(mask, lesion)
        scores[f"voxels_{name}"] = int(mask.sum())
    return scores


def support_mask(arrays: dict[str, np.ndarray], patient: int, brain_channel: int | None = None) -> np.ndarray:
    """(D, H, W) where a lesion can be for ``patient``: the image's brain mask channel ``brain_channel``
    (> 0.5), else a ``brain_mask`` array, else the head."""
    if brain_channel is not None:
        return np.asarray(arrays["image"][patient, brain_channel]) > BRAIN_CHANNEL_THRESHOLD
    if BRAIN_MASK in arrays:
        mask = np.asarray(arrays[BRAIN_MASK][patient]).astype(bool)
        return mask.reshape(mask.shape[-3:])
    return np.asarray(arrays["image"][patient]).max(axis=0) > 0


def random_map(support: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The chance level: independent uniform relevance on every voxel of ``support``, 0 elsewhere."""
    return np.where(support, rng.random(support.shape) + np.finfo(float).eps, 0.0)


def centre_map(support: np.ndarray) -> np.ndarray:
    """The "centre of the brain" prior: relevance falls linearly (in voxels) with the distance to the
    centroid of ``support``; 0 outside it. Its peak is the support voxel nearest the centroid."""
    coordinates = np.indices(support.shape).reshape(len(support.shape), -1).T
    inside = support.ravel()
    if not inside.any():
        return np.zeros(support.shape)
    distance = np.linalg.norm(coordinates - coordinates[inside].mean(axis=0), axis=1)
    relevance = 1.0 + distance.max() - distance
    return np.where(inside, relevance, 0.0).reshape(support.shape)


def spread(attribution: np.ndarray, support: np.ndarray, fraction: float) -> float:
    """Fraction of the support's voxels at ≥ ``fraction`` of the map's maximum (0 for an empty map)."""
    return float(fraction_mask(attribution, fraction)[support].mean()) if support.any() else 0.0
