"""The training objective (proposal §3.3): L = λ_diff·L_diff + λ_cls·L_cls + λ_recon·L_recon (λ_diff = 1
in the proposal; 0 gives the classifier-only ablation).

* L_cls: cross-entropy of the classifier head on z, optionally inverse-frequency class weighted so
  the rare disease is not ignored;
* L_diff: the DDPM noise-prediction loss on z (Ho et al. 2020, eq. 14). With
  ``latent_stop_gradient`` the diffusion model learns the distribution of z without pulling the
  encoders toward latents that are merely easy to denoise (the trivial minimiser is a collapsed z);
* L_recon: decoders reconstruct every modality the patient has, also the masked ones, from z
  (image MSE, tabular MSE on observed values, note keyword BCE).

Modalities the model may not use (``ModelSpec.modalities``) are no target of L_diff or L_recon, and their
decoders do not run: a dataset without images costs no image decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from meddiff import MODALITIES
from meddiff.config import TrainConfig
from meddiff.data.batches import model_inputs
from meddiff.data.tokenizer import N_SPECIAL_TOKENS
from meddiff.model.latent_stack import LatentStack
from meddiff.model.multimodal import MedDiffModel, ModelOutput

IMAGE, TEXT, TABULAR = (MODALITIES.index(m) for m in ("image", "text", "tabular"))


@dataclass
class LossBreakdown:
    """The terms of L, each a scalar tensor: ``total`` = λ_diff·``diff`` + λ_cls·``cls`` + λ_recon·``recon``."""

    total: torch.Tensor
    cls: torch.Tensor
    diff: torch.Tensor
    recon: torch.Tensor


#: The loss terms in the order of :class:`LossBreakdown` (per-epoch means in the training history).
LOSS_TERMS: tuple[str, ...] = tuple(f.name for f in fields(LossBreakdown))


def class_weights(labels: np.ndarray, n_classes: int, power: float = 1.0) -> torch.Tensor:
    """(n_classes,) weights ∝ (1 / class frequency) ** ``power``, normalised to mean 1 over the classes seen;
    0 for a class absent from ``labels``. ``power`` 1 is inverse frequency, 0.5 its square root (milder: the
    rare class still counts more, without one patient's loss outweighing a dozen others').

    Raises:
        ValueError: ``power`` is not in (0, 1].
    """
    if not 0.0 < power <= 1.0:
        raise ValueError(f"class weight power must be in (0, 1], got {power}")
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1.0) / n_classes, 0.0) ** power
    seen = weights > 0
    weights[seen] /= weights[seen].mean()
    return torch.tensor(weights, dtype=torch.float32)


def keyword_targets(token_ids: torch.Tensor, token_mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Multi-hot (B, vocab) of the non-special tokens each note contains."""
    targets = torch.zeros(token_ids.shape[0], vocab_size, device=token_ids.device)
    ids = token_ids.masked_fill(~token_mask, 0)
    targets.scatter_(1, ids, 1.0)
    targets[:, :N_SPECIAL_TOKENS] = 0.0
    return targets


def _masked_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    total = weights.sum()
    return (values * weights).sum() / total.clamp_min(1.0)


def compute_losses(
    model: MedDiffModel,
    batch: dict[str, torch.Tensor],
    output: ModelOutput,
    config: TrainConfig,
    weights: torch.Tensor | None,
    generator: torch.Generator | None = None,
) -> LossBreakdown:
    labels = batch["label"]
    # What the patient has in the data (and the model may use), masked or not: the targets of L_diff and L_recon.
    present = batch["modality_present"] & model.allowed_modalities
    allowed = model.spec.modalities
    loss_cls = F.cross_entropy(output.logits, labels, weight=weights)

    stack = LatentStack.build(output.modality_latents, present, z=output.z)  # (B, 1 + M, d)
    values = stack.values.detach() if config.latent_stop_gradient else stack.values
    loss_diff = model.diffusion.loss(values, labels, channel_known=stack.known, generator=generator)

    z = output.z
    has_image, has_text, has_tabular = (present[:, m].float() for m in (IMAGE, TEXT, TABULAR))
    loss_recon = z.new_zeros(())
    if "image" in allowed:
        image_error = ((model.image_decoder(z) - batch["image"]) ** 2).flatten(1).mean(dim=1)
        loss_recon = loss_recon + _masked_mean(image_error, has_image)
    if "tabular" in allowed:
        observed = (~batch["tabular_missing"]).float() * has_tabular.unsqueeze(1)
        tab_error = (model.tabular_decoder(z) - batch["tabular"]) ** 2
        loss_recon = loss_recon + (tab_error * observed).sum() / observed.sum().clamp_min(1.0)
    if "text" in allowed:
        vocab = model.spec.vocab_size
        kw_error = F.binary_cross_entropy_with_logits(
            model.keyword_decoder(z), keyword_targets(batch["token_ids"], batch["token_mask"], vocab), reduction="none"
        ).mean(dim=1)
        loss_recon = loss_recon + _masked_mean(kw_error, has_text)

    total = config.lambda_diff * loss_diff + config.lambda_cls * loss_cls + config.lambda_recon * loss_recon
    return LossBreakdown(total=total, cls=loss_cls, diff=loss_diff, recon=loss_recon)


class TrainingObjective(torch.nn.Module):
    """Model + loss as one module, so that one forward computes every term of L.

    Wrapping this (not the bare model) in DistributedDataParallel makes the decoders and the
    diffusion U-Net part of the forward pass whose gradients DDP synchronises.
    """

    def __init__(
        self, model: MedDiffModel, config: TrainConfig, weights: torch.Tensor | None, generator: torch.Generator
    ):
        super().__init__()
        self.model = model
        self.config = config
        self.generator = generator
        self.register_buffer("class_weights", weights if weights is not None else torch.empty(0), persistent=False)

    def forward(self, batch: dict[str, torch.Tensor], modality_present: torch.Tensor) -> dict[str, torch.Tensor]:
        """The terms of L (:data:`LOSS_TERMS`) for ``batch``, the model seeing ``modality_present``
        (B, M): the batch's own after masking. A dict, not a :class:`LossBreakdown`: with
        ``find_unused_parameters`` DDP passes the output tensors through its sink by flattening the
        output as a pytree, which opens a dict but not a dataclass."""
        output = self.model(model_inputs(batch), modality_present)
        weights = self.class_weights if self.class_weights.numel() else None
        losses = compute_losses(self.model, batch, output, self.config, weights, self.generator)
        return {name: getattr(losses, name) for name in LOSS_TERMS}
