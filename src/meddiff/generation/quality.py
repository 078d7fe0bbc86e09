"""How near synthetic patients sit to real ones (issue 12, "Quality"), each measure next to its real floor.

* :func:`frechet_distance`: the Fréchet distance between Gaussians fitted to two feature sets
  (Heusel et al. 2017, the FID formula; MONAI ``FIDMetric``).
* :func:`precision_recall`: improved precision and recall (Kynkäänniemi et al. 2019, §3): the real
  manifold is the union of balls around each real sample with radius the distance to its k-th nearest
  real neighbour; precision is the fraction of synthetic samples inside it, recall the fraction of
  real samples inside the synthetic manifold built the same way.
* 2.5-D image FID (:func:`fid_25d`): volumes are cut into sagittal, coronal and axial slices and each
  plane gets its own Fréchet distance over per-slice feature vectors (slices are the samples, as in the
  2.5-D FID of Pinaya et al. 2022, "Brain imaging generation with latent diffusion models"). Two
  feature extractors: the project's own trained image encoder (:func:`encoder_slice_features`: its
  deepest 3-D feature map averaged over the two in-plane axes, one C-vector per slice position) and a
  user-supplied 2-D TorchScript network (:func:`checkpoint_slice_features`, e.g. a RadImageNet ResNet
  exported with ``torch.jit.save``; read from a path, never downloaded).

A Fréchet distance between finite samples is biased upwards by the sample sizes, so every synthetic
measure is taken on a set of the same size as the real floor's (the caller's job; see
:mod:`.generate`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from meddiff.model.encoders import POOL, ImageEncoder

#: slicing planes of a RAS volume (B, C, X, Y, Z): the spatial axis each plane cuts across
PLANE_AXES: dict[str, int] = {"sagittal": 0, "coronal": 1, "axial": 2}
#: a 2-D checkpoint gets each slice as this many identical channels (the RGB input of ImageNet-style networks)
CHECKPOINT_IN_CHANNELS = 3
#: volumes run through a feature extractor at once
FEATURE_BATCH = 16

SliceFeatures = Callable[[np.ndarray, int], np.ndarray]


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between feature sets ``a`` (N, F) and ``b`` (M, F) (MONAI ``FIDMetric``, float64)."""
    from monai.metrics import FIDMetric

    return float(FIDMetric()(torch.from_numpy(np.asarray(a)).double(), torch.from_numpy(np.asarray(b)).double()))


def _kth_neighbour_radii(points: np.ndarray, k: int) -> np.ndarray:
    """Distance of each point (N, F) to its k-th nearest other point (N,)."""
    distances = np.sqrt(((points[:, None, :] - points[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(distances, np.inf)
    return np.sort(distances, axis=1)[:, k - 1]


def _inside_manifold(queries: np.ndarray, support: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Whether each query (Q, F) lies in some ball (support (S, F), radii (S,)): (Q,) bool."""
    distances = np.sqrt(((queries[:, None, :] - support[None, :, :]) ** 2).sum(-1))
    return (distances <= radii[None, :]).any(axis=1)


def precision_recall(real: np.ndarray, synthetic: np.ndarray, k: int) -> tuple[float, float]:
    """Improved (precision, recall) of ``synthetic`` (N, F) against ``real`` (M, F), Euclidean k-NN manifolds
    (Kynkäänniemi et al. 2019, eq. 1-3). Both in [0, 1]; a copy of ``real`` scores (1, 1).

    Raises:
        ValueError: either set has k or fewer samples (no k-th neighbour), or the feature widths differ.
    """
    if len(real) <= k or len(synthetic) <= k:
        raise ValueError(f"precision/recall with k = {k} needs more than {k} samples per set, "
                         f"got {len(real)} real and {len(synthetic)} synthetic")
    if real.shape[1:] != synthetic.shape[1:]:
        raise ValueError(f"feature shapes differ: real {real.shape[1:]}, synthetic {synthetic.shape[1:]}")
    real, synthetic = np.asarray(real, dtype=np.float64), np.asarray(synthetic, dtype=np.float64)
    precision = _inside_manifold(synthetic, real, _kth_neighbour_radii(real, k)).mean()
    recall = _inside_manifold(real, synthetic, _kth_neighbour_radii(synthetic, k)).mean()
    return float(precision), float(recall)


def _per_slice(feature_map: torch.Tensor, axis: int) -> torch.Tensor:
    """(B, C, X, Y, Z) → (B · n_slices, C): the map averaged over the two spatial axes other than ``axis``."""
    spatial = [2, 3, 4]
    spatial.remove(2 + axis)
    per_slice = feature_map.mean(dim=spatial)  # (B, C, n_slices)
    return per_slice.transpose(1, 2).reshape(-1, feature_map.shape[1])


@torch.no_grad()
def encoder_feature_map(encoder: ImageEncoder, images: torch.Tensor) -> torch.Tensor:
    """The deepest feature map (B, C, x, y, z) of the trained image encoder for volumes ``images`` (B, C_in, X, Y, Z):
    the stem and levels of :meth:`ImageEncoder.forward` without its brain gating. Processed volumes are already
    zero outside the brain, so real volumes get the forward pass's features; a decoded volume's soft brain channel
    can stay below the gate's 0.5 everywhere, and gating would blank it to one constant feature map whatever its
    content."""
    features = encoder.stem(images)
    for level in encoder.levels:
        features = level(F.max_pool3d(features, POOL))
    return features


def encoder_slice_features(encoder: ImageEncoder) -> SliceFeatures:
    """Slice features from the project's own image encoder: volumes (B, C_in, X, Y, Z) and a plane axis →
    (B · n_slices, C_deepest)."""

    def features(images: np.ndarray, axis: int) -> np.ndarray:
        encoder.eval()
        chunks = [
            _per_slice(encoder_feature_map(encoder, torch.from_numpy(images[start : start + FEATURE_BATCH]).float()),
                       axis).numpy()
            for start in range(0, len(images), FEATURE_BATCH)
        ]
        return np.concatenate(chunks)

    return features


def load_checkpoint(path: str | Path) -> torch.nn.Module:
    """A TorchScript 2-D feature network from ``path`` (``torch.jit.load``, on the CPU, in eval mode).

    Raises:
        FileNotFoundError: nothing at ``path`` (the checkpoint is never downloaded).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"generate.fid_checkpoint: no TorchScript file at {path}")
    network = torch.jit.load(str(path), map_location="cpu")
    network.eval()
    return network


def checkpoint_slice_features(network: torch.nn.Module, channel: int) -> SliceFeatures:
    """Slice features from a 2-D network: every slice of image channel ``channel`` (intensities in [0, 1]),
    repeated to :data:`CHECKPOINT_IN_CHANNELS` channels, through ``network``; an output with spatial axes
    (N, F, h, w) is averaged over them (MONAI ``FIDMetric``'s advice). Volumes (B, C, X, Y, Z) and a plane axis →
    (B · n_slices, F)."""

    @torch.no_grad()
    def features(images: np.ndarray, axis: int) -> np.ndarray:
        volumes = torch.from_numpy(np.asarray(images[:, channel], dtype=np.float32))  # (B, X, Y, Z)
        slices = volumes.movedim(1 + axis, 1).flatten(0, 1)  # (B · n_slices, H, W)
        chunks = []
        for start in range(0, len(slices), FEATURE_BATCH * 8):
            batch = slices[start : start + FEATURE_BATCH * 8].unsqueeze(1).expand(-1, CHECKPOINT_IN_CHANNELS, -1, -1)
            output = network(batch.contiguous())
            chunks.append((output.flatten(2).mean(-1) if output.dim() > 2 else output).numpy())
        return np.concatenate(chunks)

    return features


def fid_25d(features: SliceFeatures, synthetic: list[np.ndarray], real: np.ndarray, floor: np.ndarray
            ) -> dict[str, dict[str, object]]:
    """Per plane: the FID of each synthetic set of volumes (B, C, X, Y, Z) against ``real``, their mean and range,
    and the real floor (``floor`` volumes against ``real``); synthetic sets should have ``len(floor)`` volumes."""
    report: dict[str, dict[str, object]] = {}
    for plane, axis in PLANE_AXES.items():
        reference = features(real, axis)
        values = [frechet_distance(features(volumes, axis), reference) for volumes in synthetic]
        report[plane] = {
            "fid": float(np.mean(values)),
            "fid_range": [float(np.min(values)), float(np.max(values))],
            "real_floor": frechet_distance(features(floor, axis), reference),
            "n_slices_real": len(reference),
        }
    return report
