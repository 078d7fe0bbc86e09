"""Decoders from the patient latent z back to each modality (used by ``generate``).

* :class:`ImageDecoder`: z → a coarse 3-D volume of every image channel, upsampled by transposed
  convolutions;
* :class:`TabularDecoder`: z → the standardised EHR feature vector;
* :class:`KeywordDecoder`: z → which vocabulary terms a note of this patient mentions (a bag of
  words, trained with binary cross-entropy); generation writes the likeliest terms as a findings
  line. A full autoregressive note decoder is future work.

Each is trained with a reconstruction loss weighted by ``train.lambda_recon``; reconstructing a
masked modality from the latent of the others is also the cross-modal signal that masking adds.
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: The image decoder upsamples its seed volume by 2 this many times: one transposed convolution each but the
#: last, a nearest-neighbour copy (a learned or trilinear full-resolution layer over every channel cost a
#: third of the whole training step on CPU)
N_UPSAMPLINGS = 3


class ImageDecoder(nn.Module):
    """(B, d) → (B, out_channels, D, H, W) in [0, 1]; three ×2 upsamplings from a (⌈D/8⌉, ⌈H/8⌉, ⌈W/8⌉)
    seed (two transposed convolutions, a 1×1×1 convolution to the channels, one nearest), cropped to
    ``spatial_size`` (sides need not be multiples of 8)."""

    def __init__(self, d_model: int, spatial_size: tuple[int, int, int], channels: int = 16, out_channels: int = 1):
        super().__init__()
        upsampling = 2**N_UPSAMPLINGS
        self.spatial_size = tuple(spatial_size)
        self.seed_shape = (channels, *(math.ceil(side / upsampling) for side in spatial_size))
        seed_voxels = self.seed_shape[1] * self.seed_shape[2] * self.seed_shape[3]
        self.seed = nn.Linear(d_model, channels * seed_voxels)
        self.upsample = nn.Sequential(
            nn.ConvTranspose3d(channels, channels, 4, stride=2, padding=1), nn.GELU(),
            nn.ConvTranspose3d(channels, channels // 2, 4, stride=2, padding=1), nn.GELU(),
            nn.Conv3d(channels // 2, out_channels, 1),
            nn.Upsample(scale_factor=2, mode="nearest"),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        seed = self.seed(z).view(z.shape[0], *self.seed_shape)
        d, h, w = self.spatial_size
        return torch.sigmoid(self.upsample(seed)[:, :, :d, :h, :w])


class TabularDecoder(nn.Module):
    def __init__(self, d_model: int, n_features: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, n_features))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.mlp(z)


class KeywordDecoder(nn.Module):
    def __init__(self, d_model: int, vocab_size: int):
        super().__init__()
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(z)  # logits over the vocabulary
