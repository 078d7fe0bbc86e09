import torch

from meddiff.config import DiffusionConfig
from meddiff.model.diffusion import LatentDiffusion


def _diffusion() -> LatentDiffusion:
    return LatentDiffusion(16, 3, DiffusionConfig(num_train_timesteps=50, unet_channels=[8, 16]), n_channels=2)


def test_add_noise_matches_closed_form() -> None:
    diffusion = _diffusion()
    z0, noise = torch.randn(4, 2, 16), torch.randn(4, 2, 16)
    t = torch.tensor([0, 10, 25, 49])
    alpha_bar = diffusion.scheduler.alphas_cumprod[t].view(4, 1, 1)
    expected = alpha_bar.sqrt() * z0 + (1 - alpha_bar).sqrt() * noise
    torch.testing.assert_close(diffusion.scheduler.add_noise(z0, noise, t), expected)


def test_loss_is_finite_and_trains() -> None:
    torch.manual_seed(0)
    diffusion = _diffusion()
    z0 = torch.randn(32, 2, 16)
    labels = torch.randint(0, 3, (32,))
    optimizer = torch.optim.Adam(diffusion.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    first = None
    for _ in range(60):
        loss = diffusion.loss(z0, labels, generator=generator)
        first = first if first is not None else float(loss.detach())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < first


def test_sample_shape_and_determinism() -> None:
    diffusion = _diffusion().eval()
    labels = torch.tensor([0, 1, 2])
    a = diffusion.sample(labels, 5, 2.0, torch.Generator().manual_seed(1))
    b = diffusion.sample(labels, 5, 2.0, torch.Generator().manual_seed(1))
    assert a.shape == (3, 2, 16)
    torch.testing.assert_close(a, b)


def test_inpainting_keeps_known_channels_and_learns_the_missing_one() -> None:
    """Train on stacks whose channel 1 copies channel 0; inpainting channel 1 must recover it."""
    torch.manual_seed(0)
    diffusion = LatentDiffusion(16, 1, DiffusionConfig(num_train_timesteps=50, unet_channels=[8, 16]), n_channels=2)
    optimizer = torch.optim.Adam(diffusion.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    labels = torch.zeros(32, dtype=torch.long)
    for _ in range(150):
        base = torch.randn(32, 1, 16, generator=generator)
        loss = diffusion.loss(torch.cat([base, base], dim=1), labels, generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    diffusion.eval()
    truth = torch.randn(32, 1, 16, generator=generator)
    known = torch.cat([truth, torch.zeros_like(truth)], dim=1)
    mask = torch.tensor([[True, False]] * 32)
    filled = diffusion.inpaint(known, mask, 25, generator)
    torch.testing.assert_close(filled[:, 0], truth[:, 0])
    correlation = torch.corrcoef(torch.stack([filled[:, 1].flatten(), truth[:, 0].flatten()]))[0, 1]
    # Chance level is r = 0 ± 0.05 for these 512 values; the copy relation must be clearly learned.
    assert correlation > 0.2, f"inpainted channel barely follows the known one (r = {correlation:.2f})"


def test_scaler_is_the_identity_until_fitted_then_standardises_the_known_rows() -> None:
    diffusion = _diffusion()
    x = torch.randn(8, 2, 16)
    torch.testing.assert_close(diffusion.normalise(x), x, rtol=0, atol=0)
    values = torch.cat([3.0 + 0.01 * torch.randn(40, 1, 16), -1.0 + 2.0 * torch.randn(40, 1, 16)], dim=1)
    known = torch.ones(40, 2, dtype=torch.bool)
    known[:10, 1] = False
    values[:10, 1] = 0.0  # an absent modality holds zeros; they must not enter its statistics
    diffusion.fit_scaler(values, known)
    scaled = diffusion.normalise(values)
    torch.testing.assert_close(scaled[:, 0].mean(0), torch.zeros(16), atol=1e-3, rtol=0)
    torch.testing.assert_close(scaled[:, 0].std(0, unbiased=False), torch.ones(16), atol=1e-3, rtol=0)
    torch.testing.assert_close(scaled[10:, 1].mean(0), torch.zeros(16), atol=1e-4, rtol=0)
    torch.testing.assert_close(diffusion.denormalise(scaled), values, atol=1e-5, rtol=0)


def test_weights_saved_before_the_scaler_existed_load_with_the_identity() -> None:
    fitted = _diffusion()
    fitted.fit_scaler(5.0 + torch.randn(20, 2, 16), torch.ones(20, 2, dtype=torch.bool))
    old_state = {k: v for k, v in _diffusion().state_dict().items() if not k.startswith("latent_")}
    fitted.load_state_dict(old_state)  # strict: the missing scaler is filled in, not an error
    torch.testing.assert_close(fitted.latent_mean, torch.zeros(2, 16))
    torch.testing.assert_close(fitted.latent_std, torch.ones(2, 16))


def test_a_fitted_scaler_puts_samples_on_the_data_scale() -> None:
    """Latents far from N(0, I) (offset 4, spread 0.05): the sampler works in the scaled space, so even a briefly
    trained model returns samples near the data, where an unscaled one returns samples near N(0, I)."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    data = 4.0 + 0.05 * torch.randn(64, 2, 16, generator=generator)
    labels = torch.zeros(64, dtype=torch.long)
    diffusion = _diffusion()
    diffusion.fit_scaler(data, torch.ones(64, 2, dtype=torch.bool))
    optimizer = torch.optim.Adam(diffusion.parameters(), lr=3e-3)
    for _ in range(30):
        loss = diffusion.loss(data, labels, generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    samples = diffusion.eval().sample(torch.zeros(32, dtype=torch.long), 10, 1.0, generator)
    assert abs(float(samples.mean()) - 4.0) < 0.1
    assert float(samples.std()) < 0.5


def test_inpainting_with_a_fitted_scaler_returns_the_known_channels_unchanged() -> None:
    diffusion = _diffusion()
    diffusion.fit_scaler(2.0 + 0.1 * torch.randn(30, 2, 16), torch.ones(30, 2, dtype=torch.bool))
    known = torch.cat([2.0 + 0.1 * torch.randn(4, 1, 16), torch.zeros(4, 1, 16)], dim=1)
    mask = torch.tensor([[True, False]] * 4)
    filled = diffusion.eval().inpaint(known, mask, 5, torch.Generator().manual_seed(0))
    torch.testing.assert_close(filled[:, 0], known[:, 0], atol=1e-5, rtol=0)
