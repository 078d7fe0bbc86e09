"""The training objective (proposal §3.3): L = λ_diff·L_diff + λ_cls·L_cls + λ_recon·L_recon + λ_seg·L_seg
(λ_diff = 1 in the proposal; 0 gives the classifier-only ablation; λ_seg = 0 by default).

* L_cls: cross-entropy of the classifier head on z, optionally inverse-frequency class weighted so
  the rare disease is not ignored;
* L_diff: the DDPM noise-prediction loss on z (Ho et al. 2020, eq. 14). With
  ``latent_stop_gradient`` the diffusion model learns the distribution of z without pulling the
  encoders toward latents that are merely easy to denoise (the trivial minimiser is a collapsed z);
* L_recon: decoders reconstruct every modality the patient has, also the masked ones, from z
  (image MSE, tabular MSE on observed values, note keyword BCE);
* L_seg (issue 10, the lesion masks as dense auxiliary supervision): BCE over the brain voxels + soft Dice
  of the image encoder's lesion logits against the ground-truth mask, for every patient of the batch with
  an image and a mask (a healthy patient's empty mask counts), whether or not modality masking hides the
  image from the fusion. The loop reads masks of training patients only.

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
    """The terms of L, each a scalar tensor: ``total`` = λ_diff·``diff`` + λ_cls·``cls`` + λ_recon·``recon``
    + λ_seg·``seg``."""

    total: torch.Tensor
    cls: torch.Tensor
    diff: torch.Tensor
    recon: torch.Tensor
    seg: torch.Tensor


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


#: additive smoothing of the soft Dice (voxels): an empty mask and an empty prediction score 0 loss, and an
#: empty mask penalises predicted lesion mass (a healthy scan teaches "no lesion here")
DICE_SMOOTHING = 1.0


def segmentation_loss(
    logits: torch.Tensor, target: torch.Tensor, region: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """L_seg: the mean BCE over the voxels of ``region`` (per scan, then the scans' mean weighted by ``weights``)
    plus the batch's soft Dice loss 1 − (2·Σ p·t + s) / (Σ p + Σ t + s), sums over the voxels of every weighted
    scan, p = sigmoid(logit) inside ``region``, s = :data:`DICE_SMOOTHING`. One Dice over the batch, not one per
    scan: a scan with an empty mask (healthy) then adds its false-positive mass to the denominator instead of
    scoring 1 − s/(Σ p + s) ≈ 1 on its own, which would pull every prediction to zero and the lesions with it.
    ``weights`` (B,): 1 for a scan with an image and a mask, else 0. Shapes: ``logits``, ``target`` (0/1),
    ``region`` (0/1, the brain) (B, 1, D, H, W). A scalar; 0 when no weight is positive (a dataset without
    masks trains as without the loss)."""
    weights = weights.to(logits.dtype)
    region = region.to(logits.dtype)
    target = target.to(logits.dtype) * region
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    bce = (bce * region).flatten(1).sum(dim=1) / region.flatten(1).sum(dim=1).clamp_min(1.0)
    probability = (torch.sigmoid(logits) * region).flatten(1) * weights[:, None]
    target = target.flatten(1) * weights[:, None]
    overlap = (probability * target).sum()
    dice = 1.0 - (2.0 * overlap + DICE_SMOOTHING) / (probability.sum() + target.sum() + DICE_SMOOTHING)
    return _masked_mean(bce, weights) + dice


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

    loss_seg = z.new_zeros(())
    if output.lesion_logits is not None and "lesion_mask" in batch:
        brain = model.image_encoder.brain_mask(batch["image"])
        with_mask = batch["has_lesion_mask"].float() * has_image
        loss_seg = segmentation_loss(output.lesion_logits.float(), batch["lesion_mask"], brain, with_mask)

    total = (config.lambda_diff * loss_diff + config.lambda_cls * loss_cls + config.lambda_recon * loss_recon
             + config.lambda_seg * loss_seg)
    return LossBreakdown(total=total, cls=loss_cls, diff=loss_diff, recon=loss_recon, seg=loss_seg)


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
