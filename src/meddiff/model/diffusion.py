"""Latent diffusion on the hierarchy of latents (proposal §3.2.3).

The diffused sample is the latent stack x = [z, h_image, h_text, h_tabular]
(:class:`~meddiff.model.latent_stack.LatentStack`): the fused patient latent and the (LayerNorm-ed)
modality latents, each d-dimensional and laid out as a √d × √d map, one channel each (MONAI's
``DiffusionModelUNet`` has no 1-D form; d = 64 → four 8 × 8 channels). This module sees only
channels, not what they mean. Modelling them jointly lets the same network

* generate patients: sample x class-conditionally and read z, and
* impute a missing modality: inpaint its channel given the channels of the present modalities
  (RePaint, Lugmayr et al. 2022, without resampling: after every reverse step the known channels
  are replaced by the forward-noised truth at that step).

Forward process (Ho et al. 2020, eq. 4): q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I), MONAI's
``DDPMScheduler.add_noise``. The denoiser ε_θ(x_t, t, y) is conditioned on the class y through the
U-Net's class embedding; with probability ``class_dropout_p`` y is replaced by a null class, which
enables classifier-free guidance (Ho & Salimans 2022) and unconditional inpainting. Sampling uses
DDIM (Song et al. 2021). Schedules know nothing of the network; this module composes them.

Latent scaling (Rombach et al. 2022, §4.3.2 and appendix G: the latent is rescaled to unit variance
before diffusion). The raw latents are far from the N(0, I) the forward process ends in: a LayerNorm-ed
modality latent has per-dimension means near ±1 and standard deviations from 0.001 (text) to 1.4
(tabular) on the built-in cohort, so an unscaled model spends its few steps on the offset and its
samples stay near N(0, I), tens of real-floor Fréchet distances away. The diffusion therefore runs on
x̃ = (x − μ) / σ, μ and σ per channel and dimension, fitted on the training latent stacks
(:meth:`LatentDiffusion.fit_scaler`, called by the refinement phase) and stored with the weights;
``sample`` and ``inpaint`` take and return raw latents. Until fitted the scaler is the identity, so
the first (joint) training phase is unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from meddiff.config import DiffusionConfig

#: smallest per-dimension standard deviation the scaler divides by (a constant latent dimension stays finite)
MIN_LATENT_STD = 1e-6
SCALER_BUFFERS = ("latent_mean", "latent_std")
#: buffer holding the DP-SGD accounting of a privately trained model; absent otherwise (the state dict of a
#: model trained without DP is unchanged)
DP_BUFFER = "dp_sgd_accounting"
#: its fields, in order
DP_FIELDS = ("epsilon", "delta", "noise_multiplier", "max_grad_norm", "sample_rate", "steps")


class LatentDiffusion(nn.Module):
    def __init__(self, d_model: int, n_classes: int, config: DiffusionConfig, n_channels: int = 4):
        super().__init__()
        from monai.networks.nets import DiffusionModelUNet

        self.side = round(d_model**0.5)
        if self.side * self.side != d_model:
            raise ValueError(f"d_model must be a perfect square, got {d_model}")
        self.config = config
        self.n_classes = n_classes
        self.n_channels = n_channels
        self.null_class = n_classes  # index of the "no class" embedding
        channels = tuple(config.unet_channels)
        self.unet = DiffusionModelUNet(
            spatial_dims=2,
            in_channels=n_channels,
            out_channels=n_channels,
            channels=channels,
            attention_levels=(False,) * len(channels),
            num_res_blocks=1,
            norm_num_groups=min(8, min(channels)),
            num_class_embeds=n_classes + 1,
        )
        self.scheduler = self._scheduler("ddpm")
        # the latent scaler (module docstring): identity until fitted
        self.register_buffer("latent_mean", torch.zeros(n_channels, d_model))
        self.register_buffer("latent_std", torch.ones(n_channels, d_model))

    def _load_from_state_dict(
        self, state_dict: dict[str, torch.Tensor], prefix: str, local_metadata: dict, strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:
        # Weights saved before the scaler existed were trained on raw latents: they load with the identity.
        identity = {"latent_mean": torch.zeros_like(self.latent_mean), "latent_std": torch.ones_like(self.latent_std)}
        for name in SCALER_BUFFERS:
            state_dict.setdefault(prefix + name, identity[name])
        # A privately trained model carries its accounting; the buffer is made to receive it.
        if prefix + DP_BUFFER in state_dict and DP_BUFFER not in self._buffers:
            self.register_buffer(DP_BUFFER, torch.zeros_like(state_dict[prefix + DP_BUFFER]))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @torch.no_grad()
    def fit_scaler(self, values: torch.Tensor, known: torch.Tensor) -> None:
        """Set μ, σ (C, d) from latent stacks ``values`` (B, C, d), each channel over the rows where ``known``
        (B, C) is True; a channel no row knows keeps the identity.

        Raises:
            ValueError: ``values`` is not (B, C, d) for this model's C and d.
        """
        if values.dim() != 3 or tuple(values.shape[1:]) != tuple(self.latent_mean.shape):
            raise ValueError(
                f"latent stacks must be (B, {self.n_channels}, {self.side ** 2}), got {tuple(values.shape)}")
        for channel in range(self.n_channels):
            rows = values[known[:, channel], channel]
            if len(rows) == 0:
                continue
            self.latent_mean[channel] = rows.mean(dim=0)
            self.latent_std[channel] = rows.std(dim=0, unbiased=False).clamp_min(MIN_LATENT_STD) if len(rows) > 1 \
                else torch.ones_like(rows[0])

    def record_dp_accounting(self, accounting: dict[str, float]) -> None:
        """Store the DP-SGD accounting (the keys of :data:`DP_FIELDS`) with the weights."""
        self.register_buffer(DP_BUFFER, torch.tensor([float(accounting[k]) for k in DP_FIELDS], dtype=torch.float64))

    @property
    def dp_accounting(self) -> dict[str, float] | None:
        """ε, δ, noise multiplier, clipping norm, sampling rate and steps of DP-SGD training; None without DP."""
        values = self._buffers.get(DP_BUFFER)
        return None if values is None else dict(zip(DP_FIELDS, values.tolist(), strict=True))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Raw stacks (B, C, d) → the scaled space the diffusion runs in."""
        return (x - self.latent_mean) / self.latent_std

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled stacks (B, C, d) → raw latents."""
        return x * self.latent_std + self.latent_mean

    def _scheduler(self, kind: str):
        from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

        arguments = {
            "num_train_timesteps": self.config.num_train_timesteps,
            "schedule": self.config.schedule,
            "beta_start": self.config.beta_start,
            "beta_end": self.config.beta_end,
            "clip_sample": False,  # latents are LayerNorm-ed, not bounded to [-1, 1]
        }
        return DDPMScheduler(**arguments) if kind == "ddpm" else DDIMScheduler(**arguments)

    def predict_noise(self, x_t: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """ε_θ(x_t, t, y) for stacks (B, C, d)."""
        batch = x_t.shape[0]
        maps = x_t.reshape(batch, self.n_channels, self.side, self.side)
        return self.unet(maps, timesteps=timesteps, class_labels=labels).reshape(batch, self.n_channels, -1)

    def loss(
        self,
        x0: torch.Tensor,
        labels: torch.Tensor,
        channel_known: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """L_diff = E_{t,ε} ‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t, y)‖² (Ho et al. 2020, eq. 14),
        averaged over the channels whose truth is known (``channel_known`` (B, C); a modality absent
        from the data has no latent to learn). ``x0`` is raw; the loss is taken in the scaled space, where an
        unknown channel is 0 (the training mean)."""
        batch = x0.shape[0]
        x0 = self.normalise(x0)
        if channel_known is not None:
            x0 = x0 * channel_known.unsqueeze(-1).to(x0.dtype)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        timesteps = torch.randint(0, self.config.num_train_timesteps, (batch,), generator=generator, device=x0.device)
        x_t = self.scheduler.add_noise(original_samples=x0, noise=noise, timesteps=timesteps)
        drop = torch.rand(batch, generator=generator, device=x0.device) < self.config.class_dropout_p
        conditioned = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        error = ((noise - self.predict_noise(x_t, timesteps, conditioned)) ** 2).mean(dim=-1)  # (B, C)
        if channel_known is None:
            return error.mean()
        weights = channel_known.float()
        return (error * weights).sum() / weights.sum().clamp_min(1.0)

    def _reverse(
        self,
        labels: torch.Tensor,
        num_inference_steps: int,
        guidance_scale: float,
        generator: torch.Generator | None,
        known: torch.Tensor | None = None,
        known_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        scheduler = self._scheduler("ddim")
        scheduler.set_timesteps(num_inference_steps, device=labels.device)
        batch = labels.shape[0]
        shape = (batch, self.n_channels, self.side * self.side)
        x = torch.randn(shape, generator=generator, device=labels.device)
        null = torch.full_like(labels, self.null_class)
        guided = guidance_scale != 0.0 and not bool((labels == self.null_class).all())
        step_size = self.config.num_train_timesteps // num_inference_steps
        for t in scheduler.timesteps:
            timesteps = torch.full((batch,), int(t), device=labels.device, dtype=torch.long)
            eps = self.predict_noise(x, timesteps, labels)
            if guided:
                eps_null = self.predict_noise(x, timesteps, null)
                eps = eps_null + guidance_scale * (eps - eps_null)
            x, _ = scheduler.step(eps, int(t), x)
            if known is not None and known_mask is not None:
                previous = int(t) - step_size
                if previous >= 0:
                    noise = torch.randn(shape, generator=generator, device=labels.device)
                    prev_steps = torch.full((batch,), previous, device=labels.device, dtype=torch.long)
                    truth = self.scheduler.add_noise(known, noise, prev_steps)
                else:
                    truth = known
                x = torch.where(known_mask.unsqueeze(-1), truth, x)
        return self.denormalise(x)

    @torch.no_grad()
    def sample(
        self,
        labels: torch.Tensor,
        num_inference_steps: int,
        guidance_scale: float,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Class-conditional DDIM samples (B, C, d) with classifier-free guidance:
        ε̂ = ε_θ(x_t, ∅) + s · (ε_θ(x_t, y) − ε_θ(x_t, ∅))  (Ho & Salimans 2022, eq. 6)."""
        return self._reverse(labels, num_inference_steps, guidance_scale, generator)

    @torch.no_grad()
    def inpaint(
        self,
        known: torch.Tensor,
        known_mask: torch.Tensor,
        num_inference_steps: int,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Fill the channels where ``known_mask`` (B, C) is False, given the others (unconditional)."""
        labels = torch.full((known.shape[0],), self.null_class, device=known.device, dtype=torch.long)
        return self._reverse(labels, num_inference_steps, 0.0, generator, self.normalise(known), known_mask)
