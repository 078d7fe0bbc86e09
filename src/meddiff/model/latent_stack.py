"""The latent stack the diffusion model is trained on and samples (proposal §3.2.3): its one home.

Channel :data:`Z_CHANNEL` holds the fused patient latent z, channels :data:`MODALITY_CHANNELS` the
LayerNorm-ed modality latents h_image, h_text, h_tabular (in :data:`meddiff.MODALITIES` order); each
channel is d-dimensional. ``known`` says which channels hold a truth: a modality absent from the data
has no latent to learn from or to condition on, and its channel holds zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from meddiff import MODALITIES

Z_CHANNEL = 0
MODALITY_CHANNELS = slice(1, 1 + len(MODALITIES))
N_LATENT_CHANNELS = 1 + len(MODALITIES)


@dataclass(frozen=True)
class LatentStack:
    """``values`` (B, :data:`N_LATENT_CHANNELS`, d) and ``known`` (B, :data:`N_LATENT_CHANNELS`) bool."""

    values: torch.Tensor
    known: torch.Tensor

    @classmethod
    def build(
        cls, modality_latents: torch.Tensor, modality_present: torch.Tensor, z: torch.Tensor | None = None
    ) -> LatentStack:
        """Stack ``z`` (B, d) over ``modality_latents`` (B, M, d); channels of modalities not in
        ``modality_present`` (B, M), and z when it is ``None`` (to be inpainted), are unknown and zeroed."""
        z_channel = torch.zeros_like(modality_latents[:, :1]) if z is None else z.unsqueeze(1)
        values = torch.cat([z_channel, modality_latents], dim=1)  # (B, 1 + M, d)
        z_known = torch.full_like(modality_present[:, :1], z is not None)
        known = torch.cat([z_known, modality_present], dim=1)  # (B, 1 + M)
        return cls(values * known.unsqueeze(-1), known)

    @classmethod
    def complete(cls, values: torch.Tensor) -> LatentStack:
        """A stack whose every channel holds a value, e.g. one sampled or inpainted by the diffusion model."""
        return cls(values, torch.ones(values.shape[:2], dtype=torch.bool, device=values.device))

    @property
    def z(self) -> torch.Tensor:
        """(B, d) the fused patient latent."""
        return self.values[:, Z_CHANNEL]

    @property
    def modality_latents(self) -> torch.Tensor:
        """(B, M, d) the modality latents."""
        return self.values[:, MODALITY_CHANNELS]

    def __getitem__(self, rows: torch.Tensor | slice) -> LatentStack:
        """The stacks of the patients ``rows``."""
        return LatentStack(self.values[rows], self.known[rows])
