import pytest
import torch

from meddiff.model.decoders import ImageDecoder
from meddiff.model.encoders import ImageEncoder


@pytest.mark.parametrize("channels", [[4, 8], [4, 8, 8]])
def test_region_grid_is_the_backbone_feature_map(channels: list[int]) -> None:
    spatial = (16, 8, 12)
    encoder = ImageEncoder(spatial, channels, d_model=8, dropout=0.0).eval()
    features = encoder.backbone(torch.zeros(1, 1, *spatial))
    assert tuple(features.shape[2:]) == encoder.grid
    assert encoder.grid == tuple(side // encoder.downsampling for side in spatial)
    encoded = encoder(torch.zeros(2, 1, *spatial))
    assert encoded.tokens.shape == (2, encoder.grid[0] * encoder.grid[1] * encoder.grid[2], 8)


def test_sides_not_divisible_by_the_downsampling_are_refused() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        ImageEncoder((16, 10, 12), [4, 8], d_model=8, dropout=0.0)
    with pytest.raises(ValueError, match="divisible by 8"):
        ImageDecoder(8, (16, 12, 16))


def test_image_decoder_restores_the_input_shape() -> None:
    decoder = ImageDecoder(8, (16, 8, 24))
    volume = decoder(torch.randn(3, 8))
    assert volume.shape == (3, 1, 16, 8, 24)
