import torch

from meddiff.training.masking import sample_modality_mask


def test_never_masks_every_modality() -> None:
    present = torch.ones(5000, 3, dtype=torch.bool)
    present[::7, 1] = False
    used = sample_modality_mask(present, 0.9, torch.Generator().manual_seed(0))
    assert bool(used.any(dim=1).all())
    assert not bool((used & ~present).any())  # never uses what is absent


def test_rate_is_close_to_p_when_unconstrained() -> None:
    present = torch.ones(20000, 3, dtype=torch.bool)
    used = sample_modality_mask(present, 0.3, torch.Generator().manual_seed(1))
    masked = 1.0 - used.float().mean().item()
    # P(all three masked) = 0.027 rows are rescued, so the rate is slightly below 0.3.
    assert 0.27 < masked < 0.30


def test_zero_p_keeps_everything() -> None:
    present = torch.tensor([[True, False, True], [False, True, False]])
    assert torch.equal(sample_modality_mask(present, 0.0), present)
