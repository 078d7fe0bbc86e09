"""Attention read-outs of the fusion layer (proposal §3.5), from the weights the model used.

Token relevance comes from the fusion attention α_ij (modality queries i → key tokens j), by one of:

* ``attention``: α averaged over heads and queries (what the proposal names directly);
* ``grad_attention``: gradient-weighted attention, R_j = Σ_i E_h[(∂y_c/∂α_ij ⊙ α_ij)⁺] for the
  predicted class c (Chefer, Gur & Wolf 2021, "Generic attention-model explainability", eq. 5 for
  one attention layer). Raw attention also routes information the decision does not use;
  weighting by the gradient keeps the part that raises the predicted class.

Per modality:

* Image: relevance of the region tokens, laid back on the encoder's token grid and upsampled
  trilinearly to the input volume (so the map is no finer than one region token).
* Text: attention rollout (Abnar & Zuidema 2020), R = Π_l (½·Ā_l + ½·I) with rows renormalised and
  Ā_l the head-averaged self-attention of layer l; the fusion relevance of the note's output tokens
  is propagated through R to the input tokens.
* Tabular: the fusion relevance of each EHR feature token.

Known blind spot (measured in issue 10): information that reaches z through the modality queries
h_i, not through the key tokens, carries no relevance here; the faithfulness scores show it.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from meddiff.explain.attribution import Attributions, assemble, token_grid
from meddiff.model.multimodal import MedDiffModel, ModelOutput

AttentionMethod = Literal["attention", "grad_attention"]


def attention_rollout(attentions: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Rollout matrix (B, L, L) from per-layer attentions [(B, heads, L, L), ...].

    Raises:
        ValueError: no layer.
    """
    rollout = None
    for layer in attentions:
        mean = layer.mean(dim=1)
        identity = torch.eye(mean.shape[-1], device=mean.device).expand_as(mean)
        step = 0.5 * mean + 0.5 * identity
        step = step / step.sum(dim=-1, keepdim=True)
        rollout = step if rollout is None else step @ rollout
    if rollout is None:
        raise ValueError("attention rollout needs at least one layer")
    return rollout


def token_relevance(output: ModelOutput, method: AttentionMethod) -> torch.Tensor:
    """(B, T) relevance of each fusion key token.

    Raises:
        ValueError: the model has no fusion attention (concat fusion), or ``grad_attention`` without
            the gradient of the explained logit.
    """
    if output.attention is None:
        raise ValueError("attention read-outs need cross-modal attention fusion (the model uses concat fusion)")
    if method == "attention":
        return output.attention.detach().mean(dim=(1, 2))
    if output.attention.grad is None:
        raise ValueError("grad_attention needs the gradient of the explained logit w.r.t. the attention")
    weighted = (output.attention.grad * output.attention.detach()).clamp_min(0.0)  # (B, heads, M, T)
    return weighted.mean(dim=1).sum(dim=1)


def explain_attention(
    model: MedDiffModel, inputs: dict[str, torch.Tensor], present: torch.Tensor, method: AttentionMethod
) -> Attributions:
    """Forward (with attentions), backpropagate the predicted logit, and read the relevance of each
    patient's ``inputs`` with ``present`` (B, 3)."""
    model.eval()
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        output = model(inputs, present, output_attentions=True)
        if output.attention is not None:
            output.attention.retain_grad()
        predicted = output.logits.argmax(dim=1)
        output.logits.gather(1, predicted.unsqueeze(1)).sum().backward()
    model.zero_grad(set_to_none=True)
    relevance = token_relevance(output, method)
    slices = output.token_slices
    spatial = tuple(inputs["image"].shape[2:])
    image_tokens = relevance[:, slices["image"]]
    grid = token_grid(image_tokens.shape[1], spatial, model.image_encoder)
    image = F.interpolate(image_tokens.reshape(-1, 1, *grid), size=spatial, mode="trilinear", align_corners=False)
    text = relevance[:, slices["text"]]
    if output.text_attentions:
        rollout = attention_rollout(tuple(a.detach() for a in output.text_attentions))
        text = (text.unsqueeze(1) @ rollout).squeeze(1)
    mass = torch.stack([relevance[:, s].sum(dim=1) for s in slices.values()], dim=1)
    return assemble(model, inputs, present, image[:, 0], text, relevance[:, slices["tabular"]], mass)
