"""Modality-specific encoders (proposal §3.2.1).

Each encoder turns its input into a sequence of tokens of width ``d_model`` (what cross-attention
fusion attends over) and one modality latent ``h_i`` (the fusion query for that modality):

* :class:`ImageEncoder`: 3-D CNN with residual blocks (MONAI ``ResidualUnit``); its last feature map
  becomes region tokens, one per cell of a coarse voxel grid, so attributions map back to voxels;
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
from torch import nn

#: The image backbone downsamples twice by 2: the stem convolution and the first residual unit; later
#: units keep the resolution. The region-token grid is the input divided by their product.
STEM_STRIDE = 2
FIRST_UNIT_STRIDE = 2


@dataclass
class EncodedModality:
    tokens: torch.Tensor  # (B, T, d)
    token_mask: torch.Tensor  # (B, T) True where the token is real
    latent: torch.Tensor  # (B, d)


class ImageEncoder(nn.Module):
    """3-D residual CNN: (B, 1, D, H, W) → region tokens on a (D/4, H/4, W/4) grid plus a latent.

    Raises:
        ValueError: fewer than two channel levels, or a side not divisible by the downsampling (4).
    """

    def __init__(self, spatial_size: tuple[int, int, int], channels: list[int], d_model: int, dropout: float):
        super().__init__()
        from monai.networks.blocks import ResidualUnit

        if len(channels) < 2:
            raise ValueError(f"image_channels needs at least two levels, got {channels}")
        unit_strides = [FIRST_UNIT_STRIDE, *[1] * (len(channels) - 2)]  # one residual unit per level after the stem
        #: voxels per region token along each axis
        self.downsampling = STEM_STRIDE * math.prod(unit_strides)
        if any(side % self.downsampling for side in spatial_size):
            raise ValueError(f"spatial_size must be divisible by {self.downsampling}, got {spatial_size}")
        layers: list[nn.Module] = [
            nn.Conv3d(1, channels[0], kernel_size=3, stride=STEM_STRIDE, padding=1),
            nn.InstanceNorm3d(channels[0], affine=True),
            nn.PReLU(),
        ]
        for (c_in, c_out), stride in zip(itertools.pairwise(channels), unit_strides, strict=True):
            layers.append(
                ResidualUnit(
                    spatial_dims=3, in_channels=c_in, out_channels=c_out, strides=stride,
                    subunits=2, norm="INSTANCE", dropout=dropout,
                )
            )
        self.backbone = nn.Sequential(*layers)
        self.grid = tuple(side // self.downsampling for side in spatial_size)
        n_tokens = self.grid[0] * self.grid[1] * self.grid[2]
        self.project = nn.Linear(channels[-1], d_model)
        self.position = nn.Parameter(torch.zeros(1, n_tokens, d_model))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.to_latent = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, d_model))

    def forward(self, image: torch.Tensor) -> EncodedModality:
        features = self.backbone(image)  # (B, C, d, h, w)
        tokens = self.project(features.flatten(2).transpose(1, 2)) + self.position  # (B, T, d)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return EncodedModality(tokens, mask, self.to_latent(tokens.mean(dim=1)))


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
