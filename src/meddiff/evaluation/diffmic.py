"""DiffMIC-style baseline: an image-only diffusion classifier (evaluation suite, proposal §3.6).

Simplified from DiffMIC (Yang et al. 2023, "DiffMIC: Dual-Guidance Diffusion Network for Medical
Image Classification", MICCAI): the class label is the diffused sample, denoised conditioned on the
image. What is kept and what is dropped:

* **label as the sample.** y_0 = 2 · onehot(y) − 1 ∈ {−1, +1}^K (the one-hot scaled to the range of
  the Gaussian prior, as for the images of Ho et al. 2020, §3.3);
* **prior guidance.** DiffMIC's dual-granularity conditional guidance (a global and a local ROI
  prior network) plus its maximum-mean-discrepancy regulariser are reduced to one auxiliary linear
  head on c, trained with cross-entropy weighted by λ (``prior_weight``). As in DiffMIC (after CARD,
  Han et al. 2022), its guess ŷ = 2 · softmax(W c) − 1 is the mean the forward process ends at,
  q(y_t | y_0, x) = N(√ᾱ_t y_0 + (1 − √ᾱ_t) ŷ, (1 − ᾱ_t) I), and it is also fed to the denoiser.
  For a fixed ŷ that is the plain DDPM process on the residual r = y − ŷ, so MONAI's schedulers run
  unchanged on r; ``prior_mean=False`` sets ŷ = 0 (plain DDPM on y, ending at N(0, I)). On the toy
  data of the tests the prior mean is what lets a short CPU training beat chance (see the report);
* **forward process** (Ho et al. 2020, eq. 4) q(r_t | r_0) = N(√ᾱ_t r_0, (1 − ᾱ_t) I) with MONAI's
  ``DDPMScheduler.add_noise``: linear betas, ``clip_sample=False``. The DDPM range β ∈ [1e-4, 0.02]
  is meant for T = 1000; it is scaled by 1000 / T (Nichol & Dhariwal 2021, §3.2, capped at 0.999)
  so that ᾱ_T ≈ 0 also for the short chains a CPU run affords (T = 50 would otherwise end at
  ᾱ_T ≈ 0.6, far from the N(0, I) that sampling starts from; scaled, ᾱ_T ≈ 8e-6);
* **denoiser** ε_θ(r_t, t, c, ŷ): an MLP over r_t with residual blocks modulated by FiLM
  (Perez et al. 2018), whose scale and shift come from the sum of embeddings of the image
  condition c, of ŷ and of t (sinusoidal, Vaswani et al. 2017). c is the pooled ``latent`` of the
  same :class:`~meddiff.model.encoders.ImageEncoder` as our multimodal model (dimension d_model), so
  the comparison isolates multimodal fusion rather than the image backbone. The loss is

      L = E_{t, ε} ‖ε − ε_θ(√ᾱ_t r_0 + √(1 − ᾱ_t) ε, t, c, ŷ)‖²  +  λ · CE(W c, y)

  (the first term is Ho et al. 2020, eq. 14, averaged over the K label dimensions; ŷ is detached in
  it, so the prior head learns from the cross-entropy only), trained jointly end to end;
* **sampling.** Deterministic DDIM (Song et al. 2021, eq. 12 with η = 0) from r_T ~ N(0, I), i.e.
  y_T ~ N(ŷ, I), with MONAI's ``DDIMScheduler``. After each step the predicted ŷ_0 = r̂_0 + ŷ is
  clipped to [−1, 1] (the label range; DDPM clips its predicted images the same way) and r_{t−1} is
  moved accordingly: the ε-parametrised prediction r̂_0 = (r_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t amplifies
  denoiser errors by up to 1 / √ᾱ_T ≈ 360 at the first step, which without the clip makes some
  chains of a briefly trained model end at |ŷ_0| ~ 100. The last step's ŷ_0 is read. Each of
  ``n_samples`` chains gives p^(s) = softmax(ŷ_0^(s) / τ) and the returned probability is their mean
  (a mixture over the sampled labels: disagreement between chains shows up as spread probability).
  τ = 0.5 maps a clean ŷ_0 = 2 · onehot − 1 to p ≈ 0.95 for its class when K = 4.

Patients without an image get the training class prior (the label frequencies of the whole train
split), the best image-free guess under log loss; an image-only baseline has nothing else to go on.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from meddiff.data.dataset import ProcessedDataset
from meddiff.model.encoders import ImageEncoder

#: DDPM's linear beta range for T = 1000 (Ho et al. 2020, §4), rescaled by 1000 / T.
DDPM_BETA_START = 1e-4
DDPM_BETA_END = 0.02
IMAGE = 0  # column of modality_present


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017, §3.5): (B,) integer steps → (B, dim)."""
    half = dim // 2
    frequencies = torch.exp(
        -math.log(max_period) * torch.arange(half, device=timesteps.device, dtype=torch.float32) / max(half, 1)
    )
    angles = timesteps.float()[:, None] * frequencies[None]  # (B, half)
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)  # (B, 2·half)
    return F.pad(embedding, (0, dim - 2 * half))


class FiLMBlock(nn.Module):
    """Residual MLP block h + MLP(LN(h) · (1 + γ(e)) + β(e)) (FiLM, Perez et al. 2018)."""

    def __init__(self, hidden: int, cond: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.film = nn.Linear(cond, 2 * hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(e).chunk(2, dim=-1)  # 2 × (B, hidden)
        return h + self.mlp(self.norm(h) * (1 + scale) + shift)


class LabelDenoiser(nn.Module):
    """ε_θ(r_t, t, c, ŷ): (B, K) noisy residual label, (B,) steps, (B, d) image condition and (B, K)
    prior guess → (B, K) predicted noise."""

    def __init__(self, n_classes: int, d_model: int, hidden: int, n_blocks: int = 2):
        super().__init__()
        self.d_model = d_model
        self.embed_time = nn.Sequential(nn.Linear(d_model, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.embed_cond = nn.Sequential(nn.Linear(d_model, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.embed_prior = nn.Linear(n_classes, hidden)
        self.embed_label = nn.Linear(n_classes, hidden)
        self.blocks = nn.ModuleList(FiLMBlock(hidden, hidden) for _ in range(n_blocks))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, n_classes))

    def forward(
        self, r_t: torch.Tensor, timesteps: torch.Tensor, c: torch.Tensor, prior: torch.Tensor
    ) -> torch.Tensor:
        e = (
            self.embed_time(timestep_embedding(timesteps, self.d_model))
            + self.embed_cond(c)
            + self.embed_prior(prior)
        )  # (B, hidden)
        h = self.embed_label(r_t)  # (B, hidden)
        for block in self.blocks:
            h = block(h, e)
        return self.out(h)  # (B, K)


class DiffMICClassifier(nn.Module):
    """Image encoder + label denoiser + auxiliary prior head (DiffMIC, Yang et al. 2023, simplified).

    ``class_prior`` (K,) is a buffer set by :func:`train_diffmic`: the train-split label frequencies,
    returned for patients without an image.
    """

    def __init__(
        self,
        n_classes: int,
        spatial_size: tuple[int, int, int],
        image_channels: list[int],
        d_model: int,
        num_train_timesteps: int,
        hidden: int | None = None,
        prior_weight: float = 1.0,
        prior_mean: bool = True,
        in_channels: int = 1,
    ):
        super().__init__()
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be at least 2, got {num_train_timesteps}")
        self.n_classes = n_classes
        self.num_train_timesteps = num_train_timesteps
        self.prior_weight = prior_weight
        self.prior_mean = prior_mean
        self.encoder = ImageEncoder(tuple(spatial_size), list(image_channels), d_model, dropout=0.0,
                                    in_channels=in_channels)
        self.denoiser = LabelDenoiser(n_classes, d_model, hidden or 4 * d_model)
        self.prior_head = nn.Linear(d_model, n_classes)
        self.register_buffer("class_prior", torch.full((n_classes,), 1.0 / n_classes))
        self.scheduler = self.make_scheduler("ddpm")

    def make_scheduler(self, kind: str):
        """MONAI DDPM (training) or DDIM (sampling) scheduler over the same linear, T-rescaled betas."""
        from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

        scale = 1000.0 / self.num_train_timesteps
        arguments = {
            "num_train_timesteps": self.num_train_timesteps,
            "schedule": "linear_beta",
            "beta_start": min(DDPM_BETA_START * scale, 0.999),
            "beta_end": min(DDPM_BETA_END * scale, 0.999),
            "clip_sample": False,  # sample_y0 clips ŷ_0 = r̂_0 + ŷ itself: r_0's bounds depend on ŷ
        }
        return DDPMScheduler(**arguments) if kind == "ddpm" else DDIMScheduler(**arguments)

    def condition(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """c, the encoder's pooled latent (B, d), and the prior head's logits (B, K) for (B, 1, D, H, W)."""
        c = self.encoder(image).latent  # (B, d)
        return c, self.prior_head(c)

    @staticmethod
    def label_to_sample(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
        """y_0 = 2 · onehot(y) − 1: (B,) → (B, K) in {−1, +1}."""
        return 2.0 * F.one_hot(labels, n_classes).float() - 1.0

    def prior_sample(self, logits: torch.Tensor) -> torch.Tensor:
        """ŷ = 2 · softmax(prior logits) − 1 (B, K): the prior's guess in the space of y_0, or 0 when
        ``prior_mean`` is off (then the chain is the plain DDPM one, ending at N(0, I))."""
        if not self.prior_mean:
            return torch.zeros_like(logits)
        return 2.0 * torch.softmax(logits, dim=-1) - 1.0

    def diffusion_loss(
        self,
        c: torch.Tensor,
        logits: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator | None = None,
        noise_draws: int = 1,
    ) -> torch.Tensor:
        """E_{t,ε} ‖ε − ε_θ(r_t, t, c, ŷ)‖² (Ho et al. 2020, eq. 14) on the residual r_0 = y_0 − ŷ:
        r_t = √ᾱ_t r_0 + √(1 − ᾱ_t) ε (``add_noise``). ŷ comes from the detached ``logits`` (B, K).

        Each of the B patients is paired with ``noise_draws`` independent (t, ε); c is (B, d).
        """
        prior_y = self.prior_sample(logits.detach())  # (B, K)
        y0 = self.label_to_sample(labels, self.n_classes)  # (B, K)
        c_rep = c.repeat(noise_draws, 1)  # (B·n, d)
        prior_rep, y0_rep = prior_y.repeat(noise_draws, 1), y0.repeat(noise_draws, 1)  # (B·n, K) each
        noise = torch.randn(y0_rep.shape, generator=generator, device=y0.device)
        timesteps = torch.randint(
            0, self.num_train_timesteps, (y0_rep.shape[0],), generator=generator, device=y0.device
        )
        r_t = self.scheduler.add_noise(original_samples=y0_rep - prior_rep, noise=noise, timesteps=timesteps)
        return F.mse_loss(self.denoiser(r_t, timesteps, c_rep, prior_rep), noise)

    def loss(
        self,
        image: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator | None = None,
        noise_draws: int = 1,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """L = :meth:`diffusion_loss` + λ · CE(prior(c), y) for (B, 1, D, H, W) images and (B,) labels.

        Returns L and its two terms as floats.
        """
        c, logits = self.condition(image)  # (B, d), (B, K)
        diffusion = self.diffusion_loss(c, logits, labels, generator, noise_draws)
        prior = F.cross_entropy(logits, labels)
        total = diffusion + self.prior_weight * prior
        return total, {"diffusion": float(diffusion.detach()), "prior": float(prior.detach())}

    @torch.no_grad()
    def sample_y0(
        self,
        image: torch.Tensor,
        n_samples: int,
        num_inference_steps: int,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """DDIM (Song et al. 2021, eq. 12, η = 0) from y_T ~ N(ŷ, I): (B, 1, D, H, W) → ŷ_0 (S, B, K)."""
        scheduler = self.make_scheduler("ddim")
        scheduler.set_timesteps(min(num_inference_steps, self.num_train_timesteps), device=image.device)
        batch = image.shape[0]
        c, logits = self.condition(image)  # (B, d), (B, K)
        prior_y = self.prior_sample(logits).repeat(n_samples, 1)  # (S·B, K), sample-major
        c = c.repeat(n_samples, 1)  # (S·B, d)
        low, high = -1.0 - prior_y, 1.0 - prior_y  # y_0 ∈ [−1, 1]  ⇔  r_0 ∈ [−1 − ŷ, 1 − ŷ]
        step_size = self.num_train_timesteps // scheduler.num_inference_steps
        r = torch.randn((n_samples * batch, self.n_classes), generator=generator, device=image.device)
        r0 = r
        for t in scheduler.timesteps:
            timesteps = torch.full((r.shape[0],), int(t), device=image.device, dtype=torch.long)
            r, r0 = scheduler.step(self.denoiser(r, timesteps, c, prior_y), int(t), r)
            # Clip the predicted r_0 to the label range and move r_{t−1} with it: with η = 0,
            # r_{t−1} = √ᾱ_{t−1} r̂_0 + √(1 − ᾱ_{t−1}) ε̂ is linear in r̂_0 (Song et al. 2021, eq. 12).
            clipped = torch.minimum(torch.maximum(r0, low), high)
            previous = int(t) - step_size
            alpha_prev = scheduler.alphas_cumprod[previous] if previous >= 0 else scheduler.final_alpha_cumprod
            r = r + alpha_prev.to(r) ** 0.5 * (clipped - r0)
            r0 = clipped
        return (r0 + prior_y).reshape(n_samples, batch, self.n_classes)  # last step's prediction (t = 0)


def _images(data: ProcessedDataset, index: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(data.arrays["image"][index].astype(np.float32))  # (B, 1, D, H, W)


def train_diffmic(
    data: ProcessedDataset,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    d_model: int,
    image_channels: list[int],
    num_train_timesteps: int,
    seed: int,
    prior_weight: float = 1.0,
    prior_mean: bool = True,
    noise_draws: int = 4,
    weight_decay: float = 1e-4,
) -> DiffMICClassifier:
    """Train the baseline on the train-split patients that have an image (AdamW, CPU-friendly).

    Deterministic for a seed on a given machine and thread count: weights are initialised under a
    forked, seeded global RNG (the caller's RNG state is left untouched), batches are shuffled by a
    seeded numpy generator, and (t, ε) come from a seeded ``torch.Generator``.
    """
    train = data.indices("train")
    if len(train) == 0:
        raise ValueError("the train split is empty")
    counts = np.bincount(data.arrays["label"][train], minlength=data.n_classes).astype(np.float64)
    index = train[data.arrays["modality_present"][train, IMAGE].astype(bool)]
    if len(index) == 0:
        raise ValueError("no train-split patient has an image")
    spatial_size = tuple(int(s) for s in data.arrays["image"].shape[2:])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DiffMICClassifier(
            data.n_classes, spatial_size, image_channels, d_model, num_train_timesteps,
            prior_weight=prior_weight, prior_mean=prior_mean, in_channels=int(data.arrays["image"].shape[1]),
        )
    model.class_prior.copy_(torch.from_numpy(counts / counts.sum()).float())
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    labels = data.arrays["label"]
    model.train()
    for _ in range(epochs):
        order = rng.permutation(index)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            targets = torch.from_numpy(labels[batch].astype(np.int64))  # (B,)
            loss, _ = model.loss(_images(data, batch), targets, generator, noise_draws)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    return model


@torch.no_grad()
def predict_proba_diffmic(
    model: DiffMICClassifier,
    data: ProcessedDataset,
    index: np.ndarray,
    *,
    n_samples: int = 4,
    num_inference_steps: int = 20,
    seed: int = 0,
    temperature: float = 0.5,
    batch_size: int = 64,
) -> np.ndarray:
    """Class probabilities (N, K) for the patients in ``index``.

    p = mean_s softmax(ŷ_0^(s) / τ) over ``n_samples`` DDIM chains per image; patients without an
    image get ``model.class_prior``. Deterministic for a seed and ``index``: one generator draws the
    starting noise batch after batch, so a patient's chains depend on its position in ``index``.
    """
    index = np.asarray(index)
    model.eval()
    probs = np.tile(model.class_prior.cpu().numpy().astype(np.float64), (len(index), 1))  # (N, K)
    has_image = np.flatnonzero(data.arrays["modality_present"][index, IMAGE].astype(bool))
    device = model.class_prior.device
    generator = torch.Generator(device=device).manual_seed(seed)
    for start in range(0, len(has_image), batch_size):
        rows = has_image[start : start + batch_size]
        image = _images(data, index[rows]).to(device)  # (B, 1, D, H, W)
        y0 = model.sample_y0(image, n_samples, num_inference_steps, generator)  # (S, B, K)
        probs[rows] = torch.softmax(y0.double() / temperature, dim=-1).mean(dim=0).cpu().numpy()
    return probs
