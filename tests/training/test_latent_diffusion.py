"""The latent-diffusion refinement, with and without DP-SGD (train.diffusion.dp, issue 12)."""

import math

import pytest
import torch

from meddiff.config import apply_overrides
from meddiff.model.multimodal import MedDiffModel
from meddiff.training.latent_diffusion import dp_epsilon, refine_latent_diffusion
from meddiff.training.loop import build_model

DP_EPOCHS = 3


def _refined(tiny_processed, tiny_params, overrides: list[str]) -> tuple[MedDiffModel, list[float]]:
    _, data = tiny_processed
    params = apply_overrides(tiny_params, [f"train.diffusion.refine_epochs={DP_EPOCHS}",
                                           "train.diffusion.refine_batch_size=8", *overrides])
    torch.manual_seed(0)
    model = build_model(data, params)
    return model, refine_latent_diffusion(model, data, params)


def test_without_dp_no_accounting_is_stored(tiny_processed, tiny_params) -> None:
    model, losses = _refined(tiny_processed, tiny_params, [])
    assert len(losses) == DP_EPOCHS
    assert model.diffusion.dp_accounting is None
    assert "diffusion.dp_sgd_accounting" not in model.state_dict()


def test_dp_refinement_records_epsilon_and_delta(tiny_processed, tiny_params, tmp_path) -> None:
    _, data = tiny_processed
    n_train = len(data.indices("train"))
    model, losses = _refined(tiny_processed, tiny_params, ["train.diffusion.dp.enabled=true",
                                                           "train.diffusion.dp.noise_multiplier=1.0"])
    accounting = model.diffusion.dp_accounting
    assert accounting is not None and len(losses) == DP_EPOCHS and all(math.isfinite(x) for x in losses)
    assert accounting["delta"] == pytest.approx(1.0 / n_train)  # the default δ
    assert accounting["sample_rate"] == pytest.approx(8 / n_train)
    assert accounting["steps"] == DP_EPOCHS * (n_train // 8)
    assert 0 < accounting["epsilon"] < math.inf
    assert accounting["epsilon"] == pytest.approx(
        dp_epsilon(1.0, accounting["sample_rate"], int(accounting["steps"]), accounting["delta"]))
    # no per-sample-gradient hooks or attributes are left on the model
    assert all(not hasattr(p, "grad_sample") for p in model.diffusion.parameters())
    # the accounting is saved with the weights and read back
    model.save_pretrained(tmp_path / "model")
    loaded = MedDiffModel.from_pretrained(tmp_path / "model")
    assert loaded.diffusion.dp_accounting == pytest.approx(accounting)


def test_target_epsilon_is_reached(tiny_processed, tiny_params) -> None:
    model, _ = _refined(tiny_processed, tiny_params, ["train.diffusion.dp.enabled=true",
                                                      "train.diffusion.dp.target_epsilon=5.0",
                                                      "train.diffusion.dp.delta=0.001"])
    accounting = model.diffusion.dp_accounting
    assert accounting["delta"] == 0.001
    assert accounting["epsilon"] == pytest.approx(5.0, rel=0.02)
    assert accounting["epsilon"] <= 5.0


def test_epsilon_decreases_with_more_noise() -> None:
    epsilons = [dp_epsilon(sigma, 0.1, 300, 1e-3) for sigma in (0.6, 1.0, 2.0, 4.0)]
    assert all(math.isfinite(e) for e in epsilons)
    assert epsilons == sorted(epsilons, reverse=True) and epsilons[-1] < epsilons[0] / 5
    # more steps, more privacy spent
    assert dp_epsilon(1.0, 0.1, 600, 1e-3) > dp_epsilon(1.0, 0.1, 300, 1e-3)
