"""Image augmentation (issue 10): flips and shifts move the lesion mask with its image, keep labels."""

from __future__ import annotations

import torch

from meddiff.training.augmentation import augment_images


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.zeros(6, 2, 8, 10, 6)
    mask = torch.zeros(6, 1, 8, 10, 6)
    for i in range(6):  # a distinct off-centre lesion per sample, marked in both channels
        image[i, :, i, 1 + i, 2] = 1.0
        mask[i, 0, i, 1 + i, 2] = 1.0
    return image, mask


def test_the_mask_moves_with_its_image() -> None:
    image, mask = _batch()
    augmented, moved = augment_images(image, torch.Generator().manual_seed(1), flip_p=0.5, max_shift=2, mask=mask)
    assert moved is not None and augmented.shape == image.shape and moved.shape == mask.shape
    for i in range(6):
        assert torch.equal(augmented[i, 0] > 0, moved[i, 0] > 0), "lesion voxel and mask voxel coincide"
        assert torch.equal(augmented[i, 0], augmented[i, 1]), "channels move together"
        assert moved[i].sum() == 1, "a flip or roll neither loses nor duplicates voxels"
    assert not torch.equal(augmented, image), "something moved"


def test_augmentation_is_reproducible_and_leaves_the_input_alone() -> None:
    image, mask = _batch()
    first, _ = augment_images(image, torch.Generator().manual_seed(3), 0.5, 2, mask)
    second, _ = augment_images(image, torch.Generator().manual_seed(3), 0.5, 2, mask)
    assert torch.equal(first, second)
    assert torch.equal(image, _batch()[0])


def test_no_flip_and_no_shift_is_the_identity() -> None:
    image, mask = _batch()
    same, same_mask = augment_images(image, torch.Generator().manual_seed(0), 0.0, 0, mask)
    assert torch.equal(same, image) and torch.equal(same_mask, mask)


def test_shifts_stay_within_the_bound() -> None:
    image = torch.zeros(40, 1, 9, 9, 9)
    image[:, 0, 4, 4, 4] = 1.0
    shifted, _ = augment_images(image, torch.Generator().manual_seed(0), 0.0, 2)
    positions = torch.stack([torch.nonzero(shifted[i, 0])[0] for i in range(40)])
    offsets = positions - 4
    assert offsets.abs().max() == 2 and {int(v) for v in offsets.flatten()} == {-2, -1, 0, 1, 2}
