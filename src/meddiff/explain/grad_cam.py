"""Grad-CAM (Selvaraju et al. 2017) as a comparator: ``monai.visualize.GradCAM`` for the image, the
same rule on the note's and the EHR's token sequences.

* Image: on a feature map A (C, d, h, w) of the image encoder (by default its last one), weights
  w_c = mean over cells of ∂y_c/∂A, map = ReLU(Σ_c w_c A_c) upsampled trilinearly to the input
  (MONAI's upsampler), kept in its own units (no min-max normalisation).
* Note / EHR: the token sequence the encoder hands to fusion is the "feature map" (one cell per
  token or feature): w_d = mean over the real tokens of ∂y/∂A_{·d}, relevance_j = ReLU(Σ_d w_d A_jd).
* Modality mass: the first-order (gradient × activation) contribution of everything each encoder
  passes on (its tokens and its latent h_i) to the explained logit y of the predicted class.

MONAI's hooks stay on the module they were put on, so they are put on a copy of the model.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from meddiff import MODALITIES
from meddiff.explain.attribution import Attributions, assemble
from meddiff.explain.views import ImageView, last_feature_map
from meddiff.model.multimodal import MedDiffModel


def _sequence_cam(tokens: torch.Tensor, gradient: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) Grad-CAM over a token sequence (B, T, d) with its gradient and (B, T) real-token mask."""
    weight = (gradient * mask.unsqueeze(-1)).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp_min(1)  # (B, d)
    return torch.relu((tokens * weight.unsqueeze(1)).sum(dim=-1)) * mask


def explain_grad_cam(
    model: MedDiffModel, inputs: dict[str, torch.Tensor], present: torch.Tensor, layer: str = ""
) -> Attributions:
    """Grad-CAM of the predicted class for each patient; ``layer`` names the image feature map in the
    model ("" = :func:`~meddiff.explain.views.last_feature_map`)."""
    from monai.visualize import GradCAM

    model.eval()
    layer = layer or last_feature_map(model, inputs, present)
    view = ImageView(copy.deepcopy(model)).eval()
    cam = GradCAM(nn_module=view, target_layers=f"model.{layer}", postprocessing=lambda x: x)
    encoded: dict[str, object] = {}

    def keep(name: str):
        def hook(_module: nn.Module, _args: object, output: object) -> None:
            encoding = output[0] if isinstance(output, tuple) else output
            for tensor in (encoding.tokens, encoding.latent):
                tensor.retain_grad()
            encoded[name] = encoding
        return hook

    encoders = (view.model.image_encoder, view.model.text_encoder, view.model.tabular_encoder)
    handles = [encoder.register_forward_hook(keep(name)) for name, encoder in zip(MODALITIES, encoders, strict=True)]
    with torch.no_grad():
        predicted = model(inputs, present).logits.argmax(dim=1)
    maps, text, tabular, mass = [], [], [], []
    try:
        for row in range(len(predicted)):
            view.hold(inputs, present, row)
            # an input that requires grad keeps MONAI's full backward hook on the feature map well defined
            image = inputs["image"][row : row + 1].clone().requires_grad_(True)
            with torch.enable_grad():
                maps.append(cam(x=image, class_idx=int(predicted[row]))[0, 0].detach())
            fields = {name: encoded[name] for name in MODALITIES}
            text.append(_sequence_cam(fields["text"].tokens.detach(), fields["text"].tokens.grad,
                                      inputs["token_mask"][row : row + 1].float())[0])
            tabular.append(_sequence_cam(fields["tabular"].tokens.detach(), fields["tabular"].tokens.grad,
                                         fields["tabular"].token_mask.float())[0])
            mass.append(torch.stack([
                sum(((t.grad * t.detach()).sum() for t in (e.tokens, e.latent) if t.grad is not None), torch.zeros(()))
                for e in fields.values()
            ]))
    finally:
        for handle in handles:
            handle.remove()
    return assemble(model, inputs, present, torch.stack(maps), torch.stack(text), torch.stack(tabular),
                    torch.stack(mass))
