"""The DiffMIC-style baseline: shapes, valid probabilities, determinism, and that it learns the toy data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from meddiff.data.dataset import ProcessedDataset
from meddiff.evaluation.diffmic import predict_proba_diffmic, train_diffmic

TINY = {"batch_size": 16, "learning_rate": 3e-3, "d_model": 16, "image_channels": [4, 8], "num_train_timesteps": 50}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny 3-D convolutions run faster on one thread, and much faster on a shared, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_shapes_and_probabilities(tiny_processed: tuple[Path, ProcessedDataset]) -> None:
    _, data = tiny_processed
    model = train_diffmic(data, epochs=1, seed=0, **TINY)
    index = np.arange(len(data))
    probs = predict_proba_diffmic(model, data, index, n_samples=3, num_inference_steps=5)
    assert probs.shape == (len(data), data.n_classes)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    # p = mean over chains of softmax(ŷ_0 / τ), with ŷ_0 clipped to [−1, 1]: bounded away from 0 and 1.
    bound = 1.0 / (1.0 + (data.n_classes - 1) * np.exp(2.0 / 0.5))
    assert probs.min() >= bound - 1e-9 and probs.max() <= 1.0 - (data.n_classes - 1) * bound + 1e-9

    image = torch.from_numpy(data.arrays["image"][:5].astype(np.float32))
    y0 = model.sample_y0(image, n_samples=3, num_inference_steps=5, generator=torch.Generator().manual_seed(0))
    assert y0.shape == (3, 5, data.n_classes)
    assert y0.abs().max() <= 1.0 + 1e-5  # clipped to the label range
    loss, terms = model.loss(image, torch.from_numpy(data.arrays["label"][:5]))
    assert set(terms) == {"diffusion", "prior"}
    assert float(loss.detach()) == pytest.approx(terms["diffusion"] + model.prior_weight * terms["prior"], rel=1e-6)


def test_patients_without_image_get_the_training_prior(tiny_processed: tuple[Path, ProcessedDataset]) -> None:
    _, data = tiny_processed
    model = train_diffmic(data, epochs=1, seed=0, **TINY)
    train_labels = data.arrays["label"][data.indices("train")]
    expected = np.bincount(train_labels, minlength=data.n_classes) / len(train_labels)
    np.testing.assert_allclose(model.class_prior.numpy(), expected, atol=1e-6)

    arrays = dict(data.arrays)
    arrays["modality_present"] = data.arrays["modality_present"].copy()
    arrays["modality_present"][::2, 0] = False
    masked = ProcessedDataset(arrays, data.meta)
    probs = predict_proba_diffmic(model, masked, np.arange(len(masked)), n_samples=2, num_inference_steps=5)
    np.testing.assert_allclose(probs[::2], np.tile(expected, (len(probs[::2]), 1)), atol=1e-6)
    assert not np.allclose(probs[1::2], expected)


def test_deterministic_for_a_seed(tiny_processed: tuple[Path, ProcessedDataset]) -> None:
    _, data = tiny_processed
    rng_state = torch.get_rng_state()
    first, second = (train_diffmic(data, epochs=2, seed=3, **TINY) for _ in range(2))
    assert torch.equal(torch.get_rng_state(), rng_state)  # the caller's RNG is left alone
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    index = data.indices("val")
    predict = {"n_samples": 2, "num_inference_steps": 5}
    p1 = predict_proba_diffmic(first, data, index, seed=7, **predict)
    np.testing.assert_array_equal(p1, predict_proba_diffmic(second, data, index, seed=7, **predict))
    assert not np.array_equal(p1, predict_proba_diffmic(first, data, index, seed=8, **predict))
    other = train_diffmic(data, epochs=2, seed=4, **TINY)
    assert not torch.equal(other.prior_head.weight, first.prior_head.weight)


def test_learns_the_toy_data(tiny_processed: tuple[Path, ProcessedDataset]) -> None:
    """Class-dependent blob intensity is learnable: well above chance on the train split."""
    _, data = tiny_processed
    model = train_diffmic(data, epochs=40, seed=0, **TINY)
    index = data.indices("train")
    labels = data.arrays["label"][index]
    probs = predict_proba_diffmic(model, data, index, n_samples=4, num_inference_steps=10)
    accuracy = float((probs.argmax(axis=1) == labels).mean())
    auc = float(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    majority = float(np.bincount(labels).max() / len(labels))
    assert auc > 0.8, auc
    assert accuracy > majority + 0.2, (accuracy, majority)
