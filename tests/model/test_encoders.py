import math

import pytest
import torch

from meddiff.model.decoders import ImageDecoder
from meddiff.model.encoders import ImageEncoder, lesion_attention_pool, lesion_statistics

BRAIN = 4  # the brain-mask channel of a 5-channel input (data.brain.IMAGE_CHANNELS)


def _image(batch: int, spatial: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    """(B, 5, *spatial) density channels in [0, 1] with a box-shaped brain mask in the last channel."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 5, *spatial, generator=generator)
    image[:, BRAIN] = 0.0
    image[:, BRAIN, 2:-2, 2:-2, 2:-2] = 1.0
    image[:, :BRAIN] *= image[:, BRAIN : BRAIN + 1]
    return image


@pytest.mark.parametrize("channels", [[4, 8], [4, 8, 8]])
def test_region_tokens_sit_on_the_half_grid(channels: list[int]) -> None:
    spatial = (16, 8, 12)
    encoder = ImageEncoder(spatial, channels, d_model=8, dropout=0.0, in_channels=5, brain_channel=BRAIN).eval()
    assert encoder.grid == (8, 4, 6), "tokens on the first pooled level, whatever the depth"
    assert encoder.downsampling == 2 ** (len(channels) - 1)
    encoded = encoder(_image(2, spatial))
    assert encoded.tokens.shape == (2, 8 * 4 * 6, 8)
    assert encoded.latent.shape == (2, 8)
    # tokens of cells touching the brain are real, the others masked
    brain_cells = torch.nn.functional.max_pool3d(_image(1, spatial)[:, BRAIN : BRAIN + 1], 2).flatten()
    assert torch.equal(encoded.token_mask[0], brain_cells > 0)


def test_a_voxel_outside_the_brain_cannot_change_the_latent_or_the_tokens() -> None:
    spatial = (16, 16, 8)
    encoder = ImageEncoder(spatial, [4, 8, 8], d_model=8, dropout=0.0, in_channels=5, brain_channel=BRAIN).eval()
    image = _image(1, spatial)
    changed = image.clone()
    changed[0, :BRAIN, 0, 0, 0] = 1.0  # outside the brain: intensity channels only
    changed[0, :BRAIN, 15, 1, 7] = 0.7
    with torch.no_grad():
        before, after = encoder(image), encoder(changed)
    assert torch.equal(before.latent, after.latent)
    assert torch.equal(before.tokens, after.tokens)
    inside = image.clone()
    inside[0, 1, 8, 8, 4] = 1.0  # a bright voxel inside the brain does change it
    with torch.no_grad():
        assert not torch.equal(encoder(inside).latent, before.latent)


def test_the_latent_is_the_max_over_brain_cells_of_the_deepest_features() -> None:
    spatial = (16, 16, 8)
    torch.manual_seed(0)
    encoder = ImageEncoder(spatial, [4, 8, 8], d_model=8, dropout=0.0, in_channels=5, brain_channel=BRAIN).eval()
    image = _image(2, spatial, seed=1)
    with torch.no_grad():
        features = encoder.stem(image)
        for level in encoder.levels:
            features = level(torch.nn.functional.max_pool3d(features, 2))
        brain = torch.nn.functional.max_pool3d(image[:, BRAIN : BRAIN + 1], 4) > 0  # (2, 1, 4, 4, 2)
        inside = features.masked_select(brain).view(2, 8, -1)  # every brain cell of every channel
        expected = encoder.to_latent(inside.amax(dim=-1))
        torch.testing.assert_close(encoder(image).latent, expected)
        # a max, not a mean over the brain (a few lesion voxels are not averaged away)
        assert not torch.allclose(encoder.to_latent(inside.mean(dim=-1)), expected)


def test_an_image_without_brain_gives_a_zero_pooled_latent_and_no_tokens() -> None:
    spatial = (8, 8, 8)
    encoder = ImageEncoder(spatial, [4, 8], d_model=8, dropout=0.0, in_channels=5, brain_channel=BRAIN).eval()
    with torch.no_grad():
        encoded = encoder(torch.zeros(1, 5, *spatial))
    assert not encoded.token_mask.any()
    torch.testing.assert_close(encoded.latent, encoder.to_latent.bias[None])


def test_a_single_channel_input_without_brain_mask_uses_the_whole_volume() -> None:
    encoder = ImageEncoder((8, 8, 8), [4, 8], d_model=8, dropout=0.0).eval()
    encoded = encoder(torch.rand(2, 1, 8, 8, 8))
    assert encoded.token_mask.all() and encoded.tokens.shape == (2, 64, 8)


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        ImageEncoder((16, 10, 12), [4, 8, 8], d_model=8, dropout=0.0)
    with pytest.raises(ValueError, match="at least two levels"):
        ImageEncoder((16, 16, 16), [4], d_model=8, dropout=0.0)
    with pytest.raises(ValueError, match="brain_channel"):
        ImageEncoder((16, 16, 16), [4, 8], d_model=8, dropout=0.0, in_channels=2, brain_channel=2)


def test_image_decoder_restores_every_channel_at_any_size() -> None:
    decoder = ImageDecoder(8, (36, 44, 24), out_channels=5)
    volume = decoder(torch.randn(3, 8))
    assert volume.shape == (3, 5, 36, 44, 24)
    assert float(volume.detach().min()) >= 0.0 and float(volume.detach().max()) <= 1.0


def _lesion_encoder(spatial: tuple[int, int, int]) -> ImageEncoder:
    return ImageEncoder(spatial, [4, 8, 8], d_model=8, dropout=0.0, in_channels=5, brain_channel=BRAIN,
                        segmentation=True, pooling="lesion").eval()


def test_the_segmentation_head_gives_one_logit_per_voxel() -> None:
    spatial = (16, 8, 12)
    torch.manual_seed(0)
    encoded = _lesion_encoder(spatial)(_image(2, spatial))
    assert encoded.lesion_logits is not None and encoded.lesion_logits.shape == (2, 1, *spatial)
    assert encoded.latent.shape == (2, 8) and encoded.tokens.shape == (2, 8 * 4 * 6, 8)
    plain = ImageEncoder(spatial, [4, 8], d_model=8, dropout=0.0, in_channels=5, brain_channel=BRAIN)
    assert plain.segmentation_head is None and plain(_image(1, spatial)).lesion_logits is None


def test_lesion_pooling_needs_the_segmentation_head() -> None:
    with pytest.raises(ValueError, match="segmentation"):
        ImageEncoder((8, 8, 8), [4, 8], d_model=8, dropout=0.0, pooling="lesion")
    with pytest.raises(ValueError, match="pooling"):
        ImageEncoder((8, 8, 8), [4, 8], d_model=8, dropout=0.0, segmentation=True, pooling="mean")


def test_a_lesion_decides_the_attention_pool_however_large_the_brain() -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(1, 6, 8, 8, 4, generator=generator)
    cells = torch.ones(1, 1, 8, 8, 4, dtype=torch.bool)
    logits = torch.zeros(1, 1, 8, 8, 4)
    logits[0, 0, 3, 5, 1] = 30.0  # the lesion: one cell of 256
    pooled = lesion_attention_pool(features, logits, cells)
    torch.testing.assert_close(pooled[0], features[0, :, 3, 5, 1], rtol=0, atol=1e-6)
    # the rest of the brain changes: the pooled vector does not
    other = torch.randn(1, 6, 8, 8, 4, generator=generator)
    other[0, :, 3, 5, 1] = features[0, :, 3, 5, 1]
    torch.testing.assert_close(lesion_attention_pool(other, logits, cells), pooled, rtol=0, atol=1e-6)
    # a cell outside the brain never counts, whatever its logit; without a lesion it is the brain's mean
    outside = cells.clone()
    outside[0, 0, 3, 5, 1] = False
    torch.testing.assert_close(lesion_attention_pool(features, logits, outside)[0],
                               features[0].flatten(1)[:, outside.flatten()].mean(dim=1), rtol=0, atol=1e-5)
    assert torch.equal(lesion_attention_pool(features, logits, torch.zeros_like(cells)), torch.zeros(1, 6))


def test_lesion_statistics_describe_the_predicted_lesion() -> None:
    image = torch.full((2, 3, 6, 6, 6), 0.4)
    image[:, 0, 2:4, 2, 2] = 0.9  # a bright 2-voxel lesion in channel 0
    probability = torch.zeros(2, 1, 6, 6, 6)
    probability[0, 0, 2:4, 2, 2] = 1.0  # scan 0: the lesion is found; scan 1: nothing found
    stats = lesion_statistics(image, probability)
    assert stats.shape == (2, 2 + 3)
    torch.testing.assert_close(stats[0, :2], torch.tensor([math.log(3.0), 1.0]))
    torch.testing.assert_close(stats[0, 2:], torch.tensor([0.9, 0.4, 0.4]), rtol=0, atol=1e-3)
    assert stats[1].abs().max() == 0.0, "no predicted lesion: zero volume, peak and density"


def test_with_lesion_pooling_a_voxel_outside_the_brain_still_changes_nothing() -> None:
    spatial = (16, 16, 8)
    torch.manual_seed(0)
    encoder = _lesion_encoder(spatial)
    image = _image(1, spatial)
    changed = image.clone()
    changed[0, :BRAIN, 0, 0, 0] = 1.0
    with torch.no_grad():
        before, after = encoder(image), encoder(changed)
    assert torch.equal(before.latent, after.latent) and torch.equal(before.tokens, after.tokens)
