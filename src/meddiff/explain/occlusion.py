"""Occlusion sensitivity (Zeiler & Fergus 2014) as a comparator: ``monai.visualize.OcclusionSensitivity``
for the image, one element at a time for the note and the EHR.

Relevance of a region = p_c(x) − p_c(x with the region occluded), c the predicted class:

* image: cubes of ``mask_voxels`` per side set to 0 in every density channel (the value outside the
  brain, as the Integrated Gradients baseline; a brain mask channel is kept), slid with ``overlap``;
  MONAI averages the drops of the cubes covering each voxel;
* note: each real token removed (mask off, id set to [PAD]);
* EHR: each present feature marked missing (what the model sees for a feature that was not measured).

Modality mass: the summed drops of the modality's elements; for the image the voxel map summed and
divided by the cube volume (the sum over one tiling of cubes).
"""

from __future__ import annotations

import math
import warnings

import torch

from meddiff.explain.attribution import (
    IMAGE,
    TABULAR,
    TEXT,
    Attributions,
    assemble,
    mask_channels,
    predicted_probability,
)
from meddiff.explain.views import ImageView
from meddiff.model.multimodal import MedDiffModel

#: Occluded copies of an image per forward pass.
OCCLUSION_BATCH = 64
#: The value an occluded density voxel takes (the view keeps mask channels as they are).
OCCLUDED_VALUE = 0.0


def _one_at_a_time(
    model: MedDiffModel, inputs: dict[str, torch.Tensor], present: torch.Tensor, row: int,
    predicted: int, base: float, kind: str,
) -> torch.Tensor:
    """(n,) drop of p_c when each element (token or feature) of patient ``row`` is removed alone."""
    single = {name: value[row : row + 1] for name, value in inputs.items()}
    width = single["token_ids"].shape[1] if kind == "text" else single["tabular"].shape[1]
    batch = {name: value.repeat(width, *[1] * (value.ndim - 1)) for name, value in single.items()}
    removed = torch.eye(width, dtype=torch.bool)
    if kind == "text":
        batch["token_mask"] = batch["token_mask"] & ~removed
        batch["token_ids"] = batch["token_ids"].masked_fill(removed, 0)
        real = single["token_mask"][0]
    else:
        batch["tabular_missing"] = batch["tabular_missing"] | removed
        real = ~single["tabular_missing"][0]
    with torch.no_grad():
        logits = model(batch, present[row : row + 1].expand(width, -1)).logits
    drop = base - predicted_probability(logits, torch.full((width,), predicted))
    return drop * real.float()


def explain_occlusion(
    model: MedDiffModel, inputs: dict[str, torch.Tensor], present: torch.Tensor, mask_voxels: int, overlap: float
) -> Attributions:
    """Occlusion sensitivity of the predicted class's probability for each patient."""
    from monai.visualize import OcclusionSensitivity

    model.eval()
    with torch.no_grad():
        logits = model(inputs, present).logits
    predicted = logits.argmax(dim=1)
    base = predicted_probability(logits, predicted)
    view = ImageView(model, keep=mask_channels(model, inputs["image"].shape[1])).eval()
    spatial = inputs["image"].shape[2:]
    cube = tuple(min(mask_voxels, side) for side in spatial)
    occlusion = OcclusionSensitivity(
        view, mask_size=cube, n_batch=OCCLUSION_BATCH, verbose=False, mode=OCCLUDED_VALUE, overlap=overlap,
        activate=lambda out: torch.softmax(out, dim=1),
    )
    maps, text, tabular = [], [], []
    for row in range(len(predicted)):
        view.hold(inputs, present, row)
        c = int(predicted[row])
        with torch.no_grad(), warnings.catch_warnings():
            # MONAI 1.6 indexes with lists inside OcclusionSensitivity; torch warns on every patch
            warnings.filterwarnings("ignore", message="Using a non-tuple sequence", category=UserWarning)
            occluded, _ = occlusion(inputs["image"][row : row + 1])
        maps.append(float(base[row]) - occluded.as_subclass(torch.Tensor)[0, c])
        text.append(_one_at_a_time(model, inputs, present, row, c, float(base[row]), "text"))
        tabular.append(_one_at_a_time(model, inputs, present, row, c, float(base[row]), "tabular"))
    image, text_drop, tabular_drop = torch.stack(maps), torch.stack(text), torch.stack(tabular)
    mass = torch.zeros(len(predicted), 3)
    mass[:, IMAGE] = image.clamp_min(0.0).flatten(1).sum(dim=1) / math.prod(cube)
    mass[:, TEXT] = text_drop.clamp_min(0.0).sum(dim=1)
    mass[:, TABULAR] = tabular_drop.clamp_min(0.0).sum(dim=1)
    return assemble(model, inputs, present, image, text_drop, tabular_drop, mass)
