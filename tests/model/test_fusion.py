import math

import torch

from meddiff.model.fusion import CrossModalFusion


def _inputs(batch: int = 3, d: int = 8):
    torch.manual_seed(0)
    latents = [torch.randn(batch, d) for _ in range(3)]
    tokens = [torch.randn(batch, n, d) for n in (5, 4, 3)]
    masks = [torch.ones(batch, n, dtype=torch.bool) for n in (5, 4, 3)]
    return latents, tokens, masks


def test_attention_matches_proposal_equation() -> None:
    fusion = CrossModalFusion(d_model=8, n_heads=1, n_modalities=3, dropout=0.0).eval()
    latents, tokens, masks = _inputs()
    used = torch.ones(3, 3, dtype=torch.bool)
    out = fusion(latents, tokens, masks, used)
    # α_ij = softmax(Q_i K_jᵀ / √d_k), recomputed by hand for one head.
    typed = [t + fusion.modality_type[m] for m, t in enumerate(tokens)]
    keys = torch.cat([*typed, fusion.null_key.expand(3, 1, -1)], dim=1)
    q = fusion.w_q(torch.stack(latents, dim=1))
    k = fusion.w_k(keys)
    expected = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(8), dim=-1)
    torch.testing.assert_close(out.attention[:, 0], expected)
    assert torch.allclose(out.attention.sum(-1), torch.ones(3, 1, 3))


def test_masked_modality_has_no_influence() -> None:
    fusion = CrossModalFusion(d_model=8, n_heads=2, n_modalities=3, dropout=0.0).eval()
    latents, tokens, masks = _inputs()
    used = torch.tensor([[True, False, True]] * 3)
    before = fusion(latents, tokens, masks, used)
    latents[1] = latents[1] * 100 + 5
    tokens[1] = torch.randn_like(tokens[1]) * 100
    after = fusion(latents, tokens, masks, used)
    torch.testing.assert_close(before.z, after.z)
    assert float(after.attention[..., 5:9].detach().abs().sum()) == 0.0  # no weight on the masked note tokens


def test_no_modality_gives_the_learned_prior() -> None:
    fusion = CrossModalFusion(d_model=8, n_heads=2, n_modalities=3, dropout=0.0).eval()
    latents, tokens, masks = _inputs()
    used = torch.zeros(3, 3, dtype=torch.bool)
    out = fusion(latents, tokens, masks, used)
    assert torch.isfinite(out.z).all()
    torch.testing.assert_close(out.z[0], out.z[1])  # no input reaches z: the same prior for everyone
    assert torch.allclose(out.attention[..., -1], torch.ones(3, 2, 3))  # all weight on the null key
