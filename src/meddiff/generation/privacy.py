"""Privacy of synthetic patients: memorisation and membership inference (issue 12).

Both measures compare three sets of vectors in one space (the fused latent z, or flattened images):
the model's **training** patients, real **held-out** patients it never saw (validation and test) and
the **synthetic** ones.

* Nearest-neighbour distance ratio (the "distance to closest record" comparison of synthetic-data
  audits, e.g. Yale et al. 2020, Zhao et al. 2021 "CTAB-GAN"): for each synthetic patient the Euclidean
  distance to its nearest training patient, against the same distance for held-out patients.
  ``distance_ratio`` = median(synthetic→train) / median(held-out→train): a model that copies training
  patients gives ≈ 0; one that samples new patients from the population gives ≈ 1. ``n_closer_than_p1``
  counts the synthetic patients nearer to a training patient than the 1st percentile of the held-out
  distances (target: none, beyond the ~1 % a fresh population sample would have).
* Membership inference AUC (a distance attack, Hilprecht et al. 2019 "Monte Carlo and reconstruction
  membership inference"; Chen et al. 2020 "GAN-Leaks"): an attacker who holds the synthetic set scores
  each real patient by minus its distance to the nearest synthetic patient and guesses "was in the
  training set" for high scores. The AUC separating members (training) from non-members (held-out):
  0.5 = no information, 1 = every member identified (target ≤ 0.6).

Numpy only; distances are exact (no approximate index), in chunks so memory stays at
``chunk × len(reference)`` distances.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from meddiff.intervals import bootstrap_ci
from meddiff.metrics import binary_auc

#: held-out→train distance percentile below which a synthetic patient counts as "too close"
CLOSE_PERCENTILE = 1.0
#: rows of the query set per distance block
DISTANCE_CHUNK = 128


def nearest_neighbours(query: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance of every row of ``query`` (Q, F) to its nearest row of ``reference`` (R, F), and that
    row's index; both (Q,). Raises ``ValueError`` if ``reference`` is empty or the widths differ."""
    query = np.asarray(query).reshape(len(query), -1)
    reference = np.asarray(reference, dtype=np.float32).reshape(len(reference), -1)
    if len(reference) == 0 or query.shape[1] != reference.shape[1]:
        raise ValueError(f"need a non-empty reference of the query's width: query {query.shape}, "
                         f"reference {reference.shape}")
    reference_sq = (reference.astype(np.float64) ** 2).sum(axis=1)
    distances, indices = np.empty(len(query)), np.empty(len(query), dtype=np.int64)
    for start in range(0, len(query), DISTANCE_CHUNK):
        block = query[start : start + DISTANCE_CHUNK].astype(np.float32)
        products = (block @ reference.T).astype(np.float64)  # float32 search: images have ~10⁵ voxels per row
        squared = (block.astype(np.float64) ** 2).sum(axis=1)[:, None] + reference_sq[None, :] - 2.0 * products
        nearest = squared.argmin(axis=1)
        # the expanded form loses precision for near-identical rows: the winner's distance is recomputed directly
        difference = block.astype(np.float64) - reference[nearest].astype(np.float64)
        distances[start : start + len(block)] = np.sqrt((difference**2).sum(axis=1))
        indices[start : start + len(block)] = nearest
    return distances, indices


def membership_inference_auc(
    train: np.ndarray, held_out: np.ndarray, synthetic: np.ndarray, n_bootstrap: int = 0, seed: int = 0
) -> dict[str, float]:
    """AUC of the distance attack: members (``train``) against non-members (``held_out``), each scored by
    minus its distance to the nearest ``synthetic`` row (module docstring). ``{"value": auc}``, with a 95 %
    bootstrap interval over the attacked patients (``ci_low``, ``ci_high``, ``n_valid``) when ``n_bootstrap`` > 0:
    it covers which real patients are attacked, not which synthetic set was drawn."""
    member_distance, _ = nearest_neighbours(train, synthetic)
    non_member_distance, _ = nearest_neighbours(held_out, synthetic)
    is_member = np.concatenate([np.ones(len(train), bool), np.zeros(len(held_out), bool)])
    score = -np.concatenate([member_distance, non_member_distance])
    if n_bootstrap == 0:
        return {"value": binary_auc(is_member, score)}
    return bootstrap_ci(is_member, score, binary_auc, n_bootstrap, seed)


@dataclass
class ClosePair:
    """A synthetic patient and its nearest training patient; ``held_out_percentile``: the share (%) of
    held-out patients that lie nearer to a training patient than this pair does."""

    synthetic_id: str
    train_id: str
    distance: float
    held_out_percentile: float


@dataclass
class PrivacyReport:
    """The measures of one space (module docstring); distances in that space's units."""

    space: str
    distance_ratio: float
    median_synthetic_to_train: float
    median_held_out_to_train: float
    held_out_p1: float
    n_closer_than_p1: int
    fraction_closer_than_p1: float
    membership_inference_auc: float
    #: its 95 % bootstrap interval over the attacked patients, when asked for (``ci_low``, ``ci_high``, ``n_valid``)
    membership_inference_auc_interval: dict[str, float] | None
    n_synthetic: int
    n_train: int
    n_held_out: int
    closest_pairs: list[ClosePair]

    def summary(self) -> dict[str, float | int | str]:
        """The scalar measures (no pairs), for ``metrics.json``."""
        return {k: v for k, v in self.__dict__.items() if k != "closest_pairs"}


def privacy_report(
    space: str,
    synthetic: np.ndarray,
    train: np.ndarray,
    held_out: np.ndarray,
    synthetic_ids: list[str],
    train_ids: list[str],
    n_pairs: int,
    n_bootstrap: int = 0,
    seed: int = 0,
) -> PrivacyReport:
    """Distance ratio, closeness count, membership-inference AUC (with a bootstrap interval when ``n_bootstrap``
    > 0) and the ``n_pairs`` closest pairs.

    ``synthetic`` (S, …), ``train`` (T, …), ``held_out`` (H, …) in one space (flattened per row).
    """
    attack = membership_inference_auc(train, held_out, synthetic, n_bootstrap, seed)
    synthetic_distance, nearest_train = nearest_neighbours(synthetic, train)
    held_out_distance, _ = nearest_neighbours(held_out, train)
    p1 = float(np.percentile(held_out_distance, CLOSE_PERCENTILE))
    closer = int((synthetic_distance < p1).sum())
    order = np.argsort(synthetic_distance, kind="stable")[:n_pairs]
    sorted_held_out = np.sort(held_out_distance)
    pairs = [
        ClosePair(synthetic_ids[i], train_ids[nearest_train[i]], float(synthetic_distance[i]),
                  float(100.0 * np.searchsorted(sorted_held_out, synthetic_distance[i]) / len(sorted_held_out)))
        for i in order
    ]
    median_held_out = float(np.median(held_out_distance))
    return PrivacyReport(
        space=space,
        distance_ratio=float(np.median(synthetic_distance) / median_held_out) if median_held_out > 0 else float("nan"),
        median_synthetic_to_train=float(np.median(synthetic_distance)),
        median_held_out_to_train=median_held_out,
        held_out_p1=p1,
        n_closer_than_p1=closer,
        fraction_closer_than_p1=closer / len(synthetic),
        membership_inference_auc=attack["value"],
        membership_inference_auc_interval={k: v for k, v in attack.items() if k != "value"} or None,
        n_synthetic=len(synthetic),
        n_train=len(train),
        n_held_out=len(held_out),
        closest_pairs=pairs,
    )
