import torch

from meddiff.config import DiffusionConfig
from meddiff.model.diffusion import LatentDiffusion


def _diffusion() -> LatentDiffusion:
    return LatentDiffusion(16, 3, DiffusionConfig(num_train_timesteps=50, unet_channels=[8, 16]))


def test_add_noise_matches_closed_form() -> None:
    diffusion = _diffusion()
    z0, noise = torch.randn(4, 16), torch.randn(4, 16)
    t = torch.tensor([0, 10, 25, 49])
    alpha_bar = diffusion.scheduler.alphas_cumprod[t].unsqueeze(1)
    expected = alpha_bar.sqrt() * z0 + (1 - alpha_bar).sqrt() * noise
    torch.testing.assert_close(diffusion.scheduler.add_noise(z0, noise, t), expected)


def test_loss_is_finite_and_trains() -> None:
    torch.manual_seed(0)
    diffusion = _diffusion()
    z0 = torch.randn(32, 16)
    labels = torch.randint(0, 3, (32,))
    optimizer = torch.optim.Adam(diffusion.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    first = None
    for _ in range(60):
        loss = diffusion.loss(z0, labels, generator)
        first = first if first is not None else float(loss.detach())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss) < first


def test_sample_shape_and_determinism() -> None:
    diffusion = _diffusion().eval()
    labels = torch.tensor([0, 1, 2])
    a = diffusion.sample(labels, 5, 2.0, torch.Generator().manual_seed(1))
    b = diffusion.sample(labels, 5, 2.0, torch.Generator().manual_seed(1))
    assert a.shape == (3, 16)
    torch.testing.assert_close(a, b)
