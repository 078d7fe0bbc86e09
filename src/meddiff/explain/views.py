"""The multimodal model seen as a function of the image alone, for tools that call ``module(image)``
(``monai.visualize`` Grad-CAM and occlusion sensitivity).

One patient's note, EHR and ``modality_present`` are held fixed and repeated to the batch of images
the tool sends (occlusion sends many occluded copies of one image at once).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from meddiff.model.multimodal import MedDiffModel


class ImageView(nn.Module):
    """``forward(image (N, C, D, H, W)) -> logits (N, classes)`` of ``model`` for one patient's other inputs.

    Channels in ``keep`` (mask channels, e.g. the brain mask) are always the patient's own: a tool that
    occludes every channel then occludes only the densities.
    """

    def __init__(self, model: MedDiffModel, keep: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.model = model
        self.keep = keep
        self.fixed: dict[str, torch.Tensor] = {}
        self.present = torch.ones(1, 3, dtype=torch.bool)

    def hold(self, inputs: dict[str, torch.Tensor], present: torch.Tensor, row: int) -> None:
        """Fix the inputs of patient ``row`` of a batch (``inputs``, ``present`` (B, 3)); of the image,
        only the ``keep`` channels."""
        self.fixed = {name: value[row : row + 1] for name, value in inputs.items()}
        self.present = present[row : row + 1]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        n = image.shape[0]
        batch = {name: value.expand(n, *value.shape[1:]) for name, value in self.fixed.items()}
        if self.keep:
            channels = [batch["image"][:, c] if c in self.keep else image[:, c] for c in range(image.shape[1])]
            image = torch.stack(channels, dim=1)
        return self.model({**batch, "image": image}, self.present.expand(n, -1)).logits


def last_feature_map(model: MedDiffModel, inputs: dict[str, torch.Tensor], present: torch.Tensor) -> str:
    """Name (in ``model``) of the image encoder's last module whose output is still a spatial map
    (same rank as the image, more than one cell): the usual Grad-CAM layer, found by running the model.

    Raises:
        ValueError: the image encoder outputs no spatial map.
    """
    finished: list[str] = []
    rank = inputs["image"].ndim

    def record(name: str):
        def hook(_module: nn.Module, _args: object, output: object) -> None:
            if isinstance(output, torch.Tensor) and output.ndim == rank and math.prod(output.shape[2:]) > 1:
                finished.append(name)
        return hook

    handles = [
        module.register_forward_hook(record(f"image_encoder.{name}"))
        for name, module in model.image_encoder.named_modules() if name
    ]
    try:
        with torch.no_grad():
            model(inputs, present)
    finally:
        for handle in handles:
            handle.remove()
    if not finished:
        raise ValueError("the image encoder has no module with a spatial output for Grad-CAM")
    return finished[-1]
