"""The random streams of a training run, all derived from ``params.seed`` so that a run is reproducible.

Each stream starts from its own seed, so that no two streams draw the same numbers (with one seed, the
modality masks and the diffusion noise would be correlated). The offsets are far apart because under
data-parallel training every rank adds its rank to the seeds of its streams: ``seed + rank`` and
``seed + NOISE_SEED_OFFSET + rank`` must never meet for any realistic number of ranks.

* global RNGs (weight initialisation, dropout) and the modality masks: ``seed + rank``;
* the diffusion noise of L_diff (t, ε, class dropout): ``seed + NOISE_SEED_OFFSET + rank``;
* the image augmentation (flips, shifts): ``seed + AUGMENT_SEED_OFFSET + rank``;
* the latent-diffusion refinement (its noise and its batch order; rank 0 only): ``seed + REFINE_SEED_OFFSET``.

The epoch order is ``numpy.random.default_rng([seed, epoch])``, a separate stream by construction.
"""

from __future__ import annotations

import random

import numpy as np
import torch

NOISE_SEED_OFFSET = 1000
REFINE_SEED_OFFSET = 2000
AUGMENT_SEED_OFFSET = 3000


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
