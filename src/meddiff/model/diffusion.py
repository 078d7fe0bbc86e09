"""Latent diffusion on the fused patient latent z (proposal §3.2.3).

Forward process (Ho et al. 2020, eq. 4): q(z_t | z_0) = N(√ᾱ_t z_0, (1 − ᾱ_t) I), implemented by
MONAI's ``DDPMScheduler.add_noise``. The denoiser ε_θ(z_t, t, y) is MONAI's ``DiffusionModelUNet``;
MONAI has no 1-D U-Net, so the d-dimensional latent is laid out as a √d × √d single-channel map
(d = 64 → 8 × 8). The class label y conditions the U-Net through its class embedding; with
probability ``class_dropout_p`` it is replaced by a null class during training, which enables
classifier-free guidance at sampling time (Ho & Salimans 2022). Sampling uses DDIM (Song et al.
2021) for speed. Schedules know nothing of the network and vice versa; this module composes them.
"""

from __future__ import annotations

import torch
from torch import nn

from meddiff.config import DiffusionConfig


class LatentDiffusion(nn.Module):
    def __init__(self, d_model: int, n_classes: int, config: DiffusionConfig):
        super().__init__()
        from monai.networks.nets import DiffusionModelUNet

        self.side = round(d_model**0.5)
        if self.side * self.side != d_model:
            raise ValueError(f"d_model must be a perfect square, got {d_model}")
        self.config = config
        self.n_classes = n_classes
        self.null_class = n_classes  # index of the "no class" embedding for guidance
        channels = tuple(config.unet_channels)
        self.unet = DiffusionModelUNet(
            spatial_dims=2,
            in_channels=1,
            out_channels=1,
            channels=channels,
            attention_levels=(False,) * len(channels),
            num_res_blocks=1,
            norm_num_groups=min(8, min(channels)),
            num_class_embeds=n_classes + 1,
        )
        self.scheduler = self._ddpm()

    def _schedule_args(self) -> dict:
        return {
            "num_train_timesteps": self.config.num_train_timesteps,
            "schedule": self.config.schedule,
            "beta_start": self.config.beta_start,
            "beta_end": self.config.beta_end,
            "clip_sample": False,  # latents are LayerNorm-ed, not bounded to [-1, 1]
        }

    def _ddpm(self):
        from monai.networks.schedulers import DDPMScheduler

        return DDPMScheduler(**self._schedule_args())

    def _as_map(self, z: torch.Tensor) -> torch.Tensor:
        return z.view(z.shape[0], 1, self.side, self.side)

    def predict_noise(self, z_t: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """ε_θ(z_t, t, y) for flat latents (B, d)."""
        return self.unet(self._as_map(z_t), timesteps=timesteps, class_labels=labels).flatten(1)

    def loss(self, z0: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """L_diff = E_{t,ε} ‖ε − ε_θ(√ᾱ_t z_0 + √(1−ᾱ_t) ε, t, y)‖² (Ho et al. 2020, eq. 14)."""
        batch = z0.shape[0]
        noise = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
        timesteps = torch.randint(
            0, self.config.num_train_timesteps, (batch,), generator=generator, device=z0.device
        )
        z_t = self.scheduler.add_noise(original_samples=z0, noise=noise, timesteps=timesteps)
        drop = torch.rand(batch, generator=generator, device=z0.device) < self.config.class_dropout_p
        conditioned = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        return torch.mean((noise - self.predict_noise(z_t, timesteps, conditioned)) ** 2)

    @torch.no_grad()
    def sample(
        self,
        labels: torch.Tensor,
        num_inference_steps: int,
        guidance_scale: float,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Class-conditional DDIM sampling with classifier-free guidance; returns (B, d) latents.

        ε̂ = ε_θ(z_t, ∅) + s · (ε_θ(z_t, y) − ε_θ(z_t, ∅))  (Ho & Salimans 2022, eq. 6).
        """
        from monai.networks.schedulers import DDIMScheduler

        scheduler = DDIMScheduler(**self._schedule_args())
        scheduler.set_timesteps(num_inference_steps, device=labels.device)
        batch = labels.shape[0]
        z = torch.randn((batch, self.side * self.side), generator=generator, device=labels.device)
        null = torch.full_like(labels, self.null_class)
        for t in scheduler.timesteps:
            timesteps = torch.full((batch,), int(t), device=labels.device, dtype=torch.long)
            eps_cond = self.predict_noise(z, timesteps, labels)
            eps_null = self.predict_noise(z, timesteps, null)
            eps = eps_null + guidance_scale * (eps_cond - eps_null)
            z, _ = scheduler.step(eps, int(t), z)
        return z
