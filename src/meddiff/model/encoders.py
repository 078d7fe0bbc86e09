"""Modality-specific encoders (proposal §3.2.1).

Each encoder turns its input into a sequence of tokens of width ``d_model`` (what cross-attention
fusion attends over) and one modality latent ``h_i`` (the fusion query for that modality):

* :class:`ImageEncoder`: a small 3-D CNN over the density channels of the brain
  (:data:`meddiff.data.brain.IMAGE_CHANNELS`); the latent is a max over brain cells (a small lesion
  can decide), optionally with a lesion segmentation head whose logits also pool the latent
  (:func:`lesion_attention_pool`, :func:`lesion_statistics`); the region tokens sit on the
  half-resolution grid so attributions map back to voxels;
* :class:`TextEncoder`: a transformer encoder (BERT architecture) built from config, eager attention
  so that attention weights can be read for token attributions;
* :class:`TabularEncoder`: a feature tokenizer (one token per EHR feature, FT-Transformer style) and
  an MLP over the whole vector.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

#: Each level after the first halves the grid by max pooling; the region tokens sit on the grid of the
#: first pooled level (the finest grid with more than one convolution of context).
POOL = 2
TOKEN_LEVEL = 1
#: stands in for -inf outside the brain before the max (finite: no NaN in the backward pass)
OUTSIDE_BRAIN = -1e4
#: How the image latent pools the deepest level's brain cells: ``max`` alone, or ``lesion`` (the max, the
#: cells weighted by the predicted lesion, and statistics of the predicted lesion; needs the segmentation head).
IMAGE_POOLINGS: tuple[str, ...] = ("max", "lesion")
#: scalar statistics of the predicted lesion in the latent: log(1 + soft volume in voxels), peak probability
N_LESION_SCALARS = 2
#: keeps the density mean of an empty predicted lesion finite (voxels of probability)
EMPTY_LESION_VOXELS = 1e-3
#: initial lesion probability of every voxel (the logit's bias starts at its log-odds, as RetinaNet's classifier
#: does): lesions are ~0.2 % of the brain voxels; from p = 0.5 the loss spends its first hundreds of steps moving
#: one bias, and the Dice term, spread over the whole brain, says nothing about the lesion meanwhile
LESION_PRIOR = 0.01


@dataclass
class EncodedModality:
    tokens: torch.Tensor  # (B, T, d)
    token_mask: torch.Tensor  # (B, T) True where the token is real
    latent: torch.Tensor  # (B, d)
    lesion_logits: torch.Tensor | None = None  # (B, 1, D, H, W) per-voxel lesion logit (image with a seg head)


def absent_modality(batch: int, d_model: int, like: torch.Tensor) -> EncodedModality:
    """What an encoder the model may not use returns, without running it: no tokens (B, 0, d) and a zero latent
    (B, d), on ``like``'s device and dtype. No tokens rather than masked ones: the fusion's cost grows with the
    tokens (the image's region tokens outnumber the others a hundredfold)."""
    return EncodedModality(like.new_zeros(batch, 0, d_model), torch.zeros(batch, 0, dtype=torch.bool,
                                                                          device=like.device),
                           like.new_zeros(batch, d_model))


def _conv(c_in: int, c_out: int) -> nn.Sequential:
    """3³ convolution (no bias: BatchNorm follows), BatchNorm, ReLU. BatchNorm, not instance norm: the
    absolute density of a lesion is the signal, per-scan normalisation would erase it."""
    return nn.Sequential(nn.Conv3d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm3d(c_out), nn.ReLU())


def lesion_attention_pool(features: torch.Tensor, cell_logits: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """(B, C): the cells of ``features`` (B, C, d, h, w) averaged with softmax weights of ``cell_logits``
    (B, 1, d, h, w) over the cells where ``cells`` (B, 1, d, h, w, bool) is True (issue 10: a lesion the
    segmentation head finds decides the pooled vector, however many other brain cells there are). Zeros for a
    sample without cells."""
    logits = cell_logits.masked_fill(~cells, OUTSIDE_BRAIN).flatten(1)  # (B, cells)
    weights = torch.softmax(logits, dim=1) * cells.flatten(1)
    return torch.einsum("bcn,bn->bc", features.flatten(2), weights)


def lesion_statistics(image: torch.Tensor, probability: torch.Tensor) -> torch.Tensor:
    """(B, N_LESION_SCALARS + C): what the predicted lesion looks like, from the input ``image`` (B, C, D, H, W)
    and the lesion ``probability`` (B, 1, D, H, W, zero outside the brain): log(1 + soft volume in voxels),
    the peak probability, and each input channel's mean weighted by the probability (its density inside the
    lesion; ~0 without a predicted lesion)."""
    mass = probability.flatten(1).sum(dim=1, keepdim=True)  # (B, 1) soft volume
    peak = probability.flatten(1).amax(dim=1, keepdim=True)
    density = (image * probability).flatten(2).sum(dim=2) / (mass + EMPTY_LESION_VOXELS)  # (B, C)
    return torch.cat([torch.log1p(mass), peak, density], dim=1)


class LesionSegmentationHead(nn.Module):
    """One lesion logit per voxel of the full grid from the encoder's levels (issue 10: the lesion masks as dense
    auxiliary supervision). Every pooled level is upsampled (trilinear) to the first pooled grid, concatenated
    and mixed by a 1×1×1 convolution to ``channels[0]`` features; these are upsampled to the full grid, added to
    the stem's features (the fine detail of a 3-5 mm bleed), and a 1×1×1 convolution gives the logit. 1×1×1
    convolutions only: the stem's 3³ convolution at the full grid is already the costliest layer."""

    def __init__(self, channels: list[int]):
        super().__init__()
        self.merge = nn.Conv3d(sum(channels[1:]), channels[0], 1)
        self.norm = nn.BatchNorm3d(channels[0])
        self.to_logit = nn.Conv3d(channels[0], 1, 1)
        nn.init.constant_(self.to_logit.bias, math.log(LESION_PRIOR / (1.0 - LESION_PRIOR)))

    def forward(self, stem: torch.Tensor, levels: list[torch.Tensor]) -> torch.Tensor:
        """(B, 1, D, H, W) logits from ``stem`` (B, c0, D, H, W) and the pooled ``levels``."""
        grid = levels[0].shape[2:]
        merged = self.merge(torch.cat(
            [levels[0], *(F.interpolate(level, size=grid, mode="trilinear") for level in levels[1:])], dim=1))
        fine = F.interpolate(merged, size=stem.shape[2:], mode="trilinear")
        return self.to_logit(F.relu(self.norm(fine + stem)))


class ImageEncoder(nn.Module):
    """A small 3-D CNN over (B, C, D, H, W) brain channels (issue 10, ``docs/model.md``).

    ``channels`` [c0, c1, ...]: a stem convolution (C → c0) at the full grid, then per further level a max
    pooling by 2 and two convolutions. With ``brain_channel`` set, the input is zeroed outside the brain
    mask held in that channel first, so nothing outside the brain can reach the output.

    * latent ``h_image`` (B, d): max over the brain cells of the deepest level (a lesion a few voxels
      wide decides; a mean over the brain dilutes it), dropout ``latent_dropout``, linear to d (zeros for
      an image without brain);
    * tokens (B, T, d), T = prod(:attr:`grid`): one per cell of the first pooled level (``spatial_size``
      / 2: 8×8×12 mm on the default grid, against 24 mm cells before), its features concatenated with
      the deepest level's (upsampled), projected to d, plus a per-axis position embedding; tokens outside
      the brain are masked (the fusion cannot attend to air or skull);
    * with ``segmentation``, lesion logits (B, 1, D, H, W) from a :class:`LesionSegmentationHead` (trained by
      the segmentation loss, ``train.lambda_seg``); with ``pooling`` ``lesion`` the latent also gets the
      deepest cells pooled with softmax weights of the lesion logit (:func:`lesion_attention_pool`, the
      logit max-pooled per cell) and the predicted lesion's statistics (:func:`lesion_statistics`), so
      what the lesion looks like reaches the classifier.

    Raises:
        ValueError: fewer than two channel levels, a side not divisible by the total pooling, an unknown
            ``pooling``, or ``lesion`` pooling without ``segmentation``.
    """

    def __init__(
        self,
        spatial_size: tuple[int, int, int],
        channels: list[int],
        d_model: int,
        dropout: float,
        in_channels: int = 1,
        brain_channel: int | None = None,
        latent_dropout: float | None = None,
        segmentation: bool = False,
        pooling: str = "max",
    ):
        super().__init__()
        if pooling not in IMAGE_POOLINGS:
            raise ValueError(f"image pooling must be one of {IMAGE_POOLINGS}, got {pooling!r}")
        if pooling == "lesion" and not segmentation:
            raise ValueError("lesion pooling needs the segmentation head (segmentation=True)")
        if len(channels) < 2:
            raise ValueError(f"image_channels needs at least two levels, got {channels}")
        #: voxels per cell of the deepest level along each axis
        self.downsampling = POOL ** (len(channels) - 1)
        if any(side % self.downsampling for side in spatial_size):
            raise ValueError(f"spatial_size must be divisible by {self.downsampling}, got {spatial_size}")
        if brain_channel is not None and not -in_channels <= brain_channel < in_channels:
            raise ValueError(f"brain_channel {brain_channel} is not one of the {in_channels} input channels")
        self.brain_channel = brain_channel
        self.stem = _conv(in_channels, channels[0])
        self.levels = nn.ModuleList(
            nn.Sequential(_conv(c_in, c_out), _conv(c_out, c_out)) for c_in, c_out in itertools.pairwise(channels)
        )
        #: the region-token grid (cells of POOL**TOKEN_LEVEL voxels per side)
        self.grid = tuple(side // POOL**TOKEN_LEVEL for side in spatial_size)
        token_features = channels[TOKEN_LEVEL] + (channels[-1] if len(channels) - 1 > TOKEN_LEVEL else 0)
        self.project = nn.Linear(token_features, d_model)
        self.position = nn.ParameterList(nn.Parameter(torch.zeros(n, d_model)) for n in self.grid)
        for table in self.position:
            nn.init.trunc_normal_(table, std=0.02)
        self.latent_dropout = nn.Dropout(dropout if latent_dropout is None else latent_dropout)
        self.pooling = pooling
        self.segmentation_head = LesionSegmentationHead(channels) if segmentation else None
        pooled_features = channels[-1] if pooling == "max" else 2 * channels[-1] + N_LESION_SCALARS + in_channels
        self.to_latent = nn.Linear(pooled_features, d_model)

    def brain_mask(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) float: the brain channel > 0.5, or ones when the input has no brain channel."""
        if self.brain_channel is None:
            return torch.ones_like(image[:, :1])
        return (image[:, self.brain_channel : self.brain_channel + 1] > 0.5).to(image.dtype)

    def _position(self) -> torch.Tensor:
        """(T, d) position embedding: the sum of one learned row per axis (few parameters on a fine grid)."""
        d, h, w = (table for table in self.position)
        return (d[:, None, None] + h[None, :, None] + w[None, None, :]).flatten(0, 2)

    def absent(self, image: torch.Tensor) -> EncodedModality:
        """What :meth:`forward` returns for an image the model may not use: zero tokens (all masked) and a
        zero latent, without running the network."""
        return absent_modality(image.shape[0], self.to_latent.out_features, image)

    def forward(self, image: torch.Tensor) -> EncodedModality:
        brain = self.brain_mask(image)
        image = image * brain
        stem = self.stem(image)
        features, levels = stem, []
        for level in self.levels:
            features = level(F.max_pool3d(features, POOL))
            levels.append(features)
        deepest = levels[-1]  # (B, C, d, h, w)
        brain_deep = F.adaptive_max_pool3d(brain, deepest.shape[2:]) > 0  # a cell touching the brain
        has_brain = brain_deep.flatten(1).any(dim=1, keepdim=True)
        pooled = deepest.masked_fill(~brain_deep, OUTSIDE_BRAIN).flatten(2).amax(dim=-1)  # (B, C)
        pooled = torch.where(has_brain, pooled, torch.zeros_like(pooled))
        lesion_logits = self.segmentation_head(stem, levels) if self.segmentation_head is not None else None
        if self.pooling == "lesion" and lesion_logits is not None:
            in_brain = lesion_logits.masked_fill(brain <= 0, OUTSIDE_BRAIN)
            attended = lesion_attention_pool(deepest, F.adaptive_max_pool3d(in_brain, deepest.shape[2:]), brain_deep)
            summary = lesion_statistics(image, torch.sigmoid(lesion_logits) * brain)
            latent = self.to_latent(torch.cat([self.latent_dropout(torch.cat([pooled, attended], dim=1)), summary], 1))
        else:
            latent = self.to_latent(self.latent_dropout(pooled))

        fine = levels[TOKEN_LEVEL - 1]
        parts = [fine] if deepest is fine else [fine, F.interpolate(deepest, size=fine.shape[2:], mode="nearest")]
        tokens = self.project(torch.cat(parts, dim=1).flatten(2).transpose(1, 2)) + self._position()  # (B, T, d)
        token_mask = (F.adaptive_max_pool3d(brain, fine.shape[2:]) > 0).flatten(1)  # (B, T)
        return EncodedModality(tokens, token_mask, latent, lesion_logits)


class TextEncoder(nn.Module):
    """Transformer encoder for clinical notes (BERT architecture, built from config, no download).

    A pretrained checkpoint (e.g. a clinical BERT) can be loaded later from a local path; by default
    the weights are trained from scratch with the rest of the model. The latent is the [CLS] token.
    """

    def __init__(self, vocab_size: int, max_tokens: int, d_model: int, layers: int, heads: int, dropout: float):
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(
            vocab_size=vocab_size,
            hidden_size=d_model,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=2 * d_model,
            max_position_embeddings=max_tokens,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            pad_token_id=0,
        )
        config._attn_implementation = "eager"  # sdpa returns no attention weights
        self.bert = BertModel(config, add_pooling_layer=False)

    def forward(
        self, token_ids: torch.Tensor, token_mask: torch.Tensor, output_attentions: bool = False
    ) -> tuple[EncodedModality, tuple[torch.Tensor, ...] | None]:
        output = self.bert(
            input_ids=token_ids, attention_mask=token_mask.long(), output_attentions=output_attentions
        )
        tokens = output.last_hidden_state  # (B, L, d)
        attentions = output.attentions if output_attentions else None  # L layers × (B, heads, L, L)
        return EncodedModality(tokens, token_mask, tokens[:, 0]), attentions


class TabularEncoder(nn.Module):
    """One token per EHR feature (value × learned direction + bias, or a learned missing embedding)."""

    def __init__(self, n_features: int, d_model: int, hidden: int, dropout: float):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_features, d_model) * 0.1)
        self.bias = nn.Parameter(torch.zeros(n_features, d_model))
        self.missing = nn.Parameter(torch.randn(n_features, d_model) * 0.1)
        self.mlp = nn.Sequential(
            nn.Linear(2 * n_features, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, d_model)
        )

    def forward(self, values: torch.Tensor, missing: torch.Tensor) -> EncodedModality:
        values = values.masked_fill(missing, 0.0)
        tokens = values.unsqueeze(-1) * self.weight + self.bias  # (B, F, d)
        tokens = torch.where(missing.unsqueeze(-1), self.missing.expand_as(tokens), tokens)
        latent = self.mlp(torch.cat([values, missing.float()], dim=-1))
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return EncodedModality(tokens, mask, latent)
