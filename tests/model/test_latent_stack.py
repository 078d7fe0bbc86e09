import torch

from meddiff import MODALITIES
from meddiff.model.latent_stack import MODALITY_CHANNELS, N_LATENT_CHANNELS, Z_CHANNEL, LatentStack


def test_build_stacks_z_over_the_modality_latents_and_zeroes_the_unknown() -> None:
    z, latents = torch.randn(2, 4), torch.randn(2, len(MODALITIES), 4)
    present = torch.tensor([[True, False, True], [False, True, True]])
    stack = LatentStack.build(latents, present, z=z)
    assert stack.values.shape == (2, N_LATENT_CHANNELS, 4)
    assert stack.known.tolist() == [[True, True, False, True], [True, False, True, True]]
    torch.testing.assert_close(stack.z, z, rtol=0, atol=0)
    torch.testing.assert_close(stack.values[:, Z_CHANNEL], z, rtol=0, atol=0)
    torch.testing.assert_close(stack.modality_latents, latents * present.unsqueeze(-1), rtol=0, atol=0)
    assert stack.values[~stack.known].abs().sum() == 0


def test_build_without_z_leaves_it_to_be_inpainted() -> None:
    latents = torch.randn(2, len(MODALITIES), 4)
    present = torch.ones(2, len(MODALITIES), dtype=torch.bool)
    stack = LatentStack.build(latents, present)
    assert stack.known[:, Z_CHANNEL].tolist() == [False, False]
    assert stack.known[:, MODALITY_CHANNELS].all()
    assert stack.z.abs().sum() == 0


def test_complete_stack_and_row_selection() -> None:
    values = torch.randn(5, N_LATENT_CHANNELS, 4)
    stack = LatentStack.complete(values)
    assert bool(stack.known.all())
    rows = torch.tensor([4, 1])
    picked = stack[rows]
    torch.testing.assert_close(picked.values, values[rows], rtol=0, atol=0)
    torch.testing.assert_close(picked.modality_latents, values[rows][:, 1:], rtol=0, atol=0)
