"""Integrated Gradients over all three modalities at once (Sundararajan, Taly & Yan 2017; ``captum``).

IG_x = (x − x') · ∫₀¹ ∂F(x' + a(x − x'))/∂x da, with F the probability of the predicted class, so
that the attributions of all inputs sum to F(x) − F(x') (completeness): in probability units, the
same units as what deleting a modality does to the prediction.

Inputs and baselines x':

* image (B, C, D, H, W): density channels 0 (the value outside the brain after preprocessing), a brain
  mask channel kept as it is (it is not attributed); the voxel map is the sum over channels;
* note: the word embeddings of the tokens (the note's only continuous input), baseline the [PAD]
  embedding at every position; a token's relevance is the sum over the embedding dimension. The
  embeddings are fed in by a forward hook on the text encoder's embedding table, so the model's own
  forward runs unchanged;
* EHR (B, F): zeros, the training mean after scaling; missing features stay missing (their value
  never reaches the model, so they get no attribution).

Token masks, missingness flags and ``modality_present`` are held fixed along the path.
"""

from __future__ import annotations

import torch
from torch import nn

from meddiff.explain.attribution import IMAGE, TABULAR, TEXT, Attributions, assemble, density_baseline, mask_channels
from meddiff.model.multimodal import MedDiffModel

#: The tokenizer's padding id (the baseline token).
PAD_ID = 0
#: Path points evaluated in one forward pass (bounds memory for large batches).
INTERNAL_BATCH = 64


def word_embeddings(model: MedDiffModel) -> nn.Embedding:
    """The text encoder's token embedding table.

    Raises:
        TypeError: the text encoder has no BERT-style ``embeddings.word_embeddings`` table.
    """
    table = getattr(getattr(getattr(model.text_encoder, "bert", None), "embeddings", None), "word_embeddings", None)
    if not isinstance(table, nn.Embedding):
        raise TypeError("Integrated Gradients needs the text encoder's word embedding table (bert.embeddings)")
    return table


def explain_integrated_gradients(
    model: MedDiffModel, inputs: dict[str, torch.Tensor], present: torch.Tensor, n_steps: int
) -> Attributions:
    """IG of the predicted class's probability for each patient, ``n_steps`` Gauss-Legendre points."""
    from captum.attr import IntegratedGradients

    model.eval()
    table = word_embeddings(model)
    with torch.no_grad():
        predicted = model(inputs, present).logits.argmax(dim=1)
        words = table(inputs["token_ids"])
        pad = table(torch.full_like(inputs["token_ids"], PAD_ID))
    baseline_image = density_baseline(inputs["image"], mask_channels(model, inputs["image"].shape[1]))

    def probability(
        image: torch.Tensor, embedded: torch.Tensor, tabular: torch.Tensor, token_ids: torch.Tensor,
        token_mask: torch.Tensor, tabular_missing: torch.Tensor, modality_present: torch.Tensor,
    ) -> torch.Tensor:
        handle = table.register_forward_hook(lambda _module, _args, _output: embedded)
        try:
            batch = {"image": image, "token_ids": token_ids, "token_mask": token_mask,
                     "tabular": tabular, "tabular_missing": tabular_missing}
            return torch.softmax(model(batch, modality_present).logits, dim=-1)
        finally:
            handle.remove()

    image_attr, text_attr, tabular_attr = IntegratedGradients(probability).attribute(
        (inputs["image"], words, inputs["tabular"]),
        baselines=(baseline_image, pad, torch.zeros_like(inputs["tabular"])),
        target=predicted,
        additional_forward_args=(inputs["token_ids"], inputs["token_mask"], inputs["tabular_missing"], present),
        n_steps=n_steps,
        internal_batch_size=INTERNAL_BATCH,
    )
    model.zero_grad(set_to_none=True)
    image_map = image_attr.detach().sum(dim=1)  # (B, D, H, W)
    text = text_attr.detach().sum(dim=-1) * inputs["token_mask"].float()
    tabular = tabular_attr.detach() * (~inputs["tabular_missing"]).float()
    mass = torch.zeros(len(predicted), 3)
    mass[:, IMAGE] = image_map.flatten(1).sum(dim=1)
    mass[:, TEXT] = text.sum(dim=1)
    mass[:, TABULAR] = tabular.sum(dim=1)
    return assemble(model, inputs, present, image_map, text, tabular, mass)
