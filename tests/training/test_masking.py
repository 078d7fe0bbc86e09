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
    # A row loses 3 · 0.3 slots on average, less the one slot given back to the rows that lost all
    # three (probability 0.3³): (0.9 − 0.027) / 3 = 0.291. The standard error over 20 000 rows is ≈ 0.002.
    assert abs(masked - (3 * 0.3 - 0.3**3) / 3) < 0.006
    assert bool(used.any(dim=1).all())


def test_zero_p_keeps_everything() -> None:
    present = torch.tensor([[True, False, True], [False, True, False]])
    assert torch.equal(sample_modality_mask(present, 0.0), present)


def test_exact_fraction_is_exact_when_feasible() -> None:
    from meddiff.training.masking import mask_exact_fraction

    present = torch.ones(50, 3, dtype=torch.bool)
    present[:10, 2] = False  # 140 present slots
    for fraction in (0.0, 0.2, 0.4, 0.6):
        used = mask_exact_fraction(present, fraction, torch.Generator().manual_seed(3))
        assert int((present & ~used).sum()) == round(fraction * 140)
        assert bool(used.any(dim=1).all())
    capped = mask_exact_fraction(present, 0.8, torch.Generator().manual_seed(3))
    assert int((present & ~capped).sum()) == 140 - 50  # every patient keeps exactly one
    assert bool((capped.sum(dim=1) == 1).all())


def test_drop_modality_keeps_sole_modality() -> None:
    from meddiff.training.masking import drop_modality

    present = torch.tensor([[True, True, False], [True, False, False]])
    assert drop_modality(present, 0).tolist() == [[False, True, False], [True, False, False]]
