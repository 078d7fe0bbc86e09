import json

import numpy as np
import torch

from meddiff import MODALITIES
from meddiff.data.batches import model_inputs, to_batch
from meddiff.explain.attribution import Attributions, attention_rollout, dice, explain_batch, pointing_hit
from meddiff.explain.report import localisation, run_explain


def test_dice() -> None:
    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = np.zeros((4, 4), bool)
    b[1:3] = True
    assert dice(a, b) == 0.5
    assert dice(a, a) == 1.0
    assert dice(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0


def test_rollout_rows_are_distributions() -> None:
    layers = tuple(torch.softmax(torch.randn(2, 3, 5, 5), dim=-1) for _ in range(2))
    rollout = attention_rollout(layers)
    torch.testing.assert_close(rollout.sum(-1), torch.ones(2, 5))
    # With uniform attention, each layer is ½·(1/L) + ½·I; two layers compose to their product.
    uniform = torch.full((1, 1, 4, 4), 0.25)
    step = 0.5 * torch.full((4, 4), 0.25) + 0.5 * torch.eye(4)
    torch.testing.assert_close(attention_rollout((uniform, uniform))[0], step @ step)


def test_pointing_game_and_localisation_against_the_lesion(tiny_processed) -> None:
    _, data = tiny_processed
    patient = int(np.flatnonzero(data.arrays["has_lesion_mask"])[0])
    lesion = data.arrays["lesion_mask"][patient, 0].astype(bool)
    on_lesion = lesion.astype(float)
    # The voxel farthest (in city-block distance) from the lesion's centre.
    far = np.argwhere(~lesion)[np.argmax(np.abs(np.argwhere(~lesion) - np.argwhere(lesion).mean(0)).sum(1))]
    elsewhere = np.zeros_like(on_lesion)
    elsewhere[tuple(far)] = 1.0
    assert pointing_hit(on_lesion, lesion) and not pointing_hit(elsewhere, lesion)

    def attributions(image: np.ndarray) -> Attributions:
        return Attributions(image[None], np.zeros((1, 1)), np.zeros((1, 1)), np.zeros((1, 3)), np.zeros(1),
                            np.zeros((1, 1)))

    perfect = localisation(attributions(on_lesion), data, np.array([patient]), threshold=0.5, seed=0)[0]
    assert perfect["dice"] == 1.0 and perfect["pointing_hit"]
    assert perfect["mask_voxels"] == perfect["lesion_voxels"] == int(lesion.sum())
    assert perfect["pointing_chance"] > lesion.mean()  # the lesion dilated by one voxel
    missed = localisation(attributions(elsewhere), data, np.array([patient]), threshold=0.5, seed=0)[0]
    assert missed["dice"] == 0.0 and not missed["pointing_hit"]


def test_absent_modality_gets_no_relevance(tiny_processed, tiny_params) -> None:
    from meddiff.training.loop import build_model

    _, data = tiny_processed
    torch.manual_seed(0)
    model = build_model(data, tiny_params)
    batch = to_batch(data, np.arange(4))
    present = batch["modality_present"].clone()
    present[:, MODALITIES.index("text")] = False
    explained = explain_batch(model, model_inputs(batch), present, "grad_attention")
    assert explained.modality_share.shape == (4, len(MODALITIES))
    np.testing.assert_array_equal(explained.modality_share[:, MODALITIES.index("text")], 0.0)
    np.testing.assert_array_equal(explained.text, 0.0)
    np.testing.assert_allclose(explained.modality_share.sum(axis=1), 1.0, rtol=1e-6)
    with torch.no_grad():
        logits = model(model_inputs(batch), present).logits
    np.testing.assert_array_equal(explained.predicted, logits.argmax(dim=1).numpy())


def test_explain_report(trained_tiny, tmp_path) -> None:
    params = trained_tiny["params"]
    result = run_explain(params, trained_tiny["processed"], trained_tiny["models"], tmp_path / "x")
    html = (tmp_path / "x" / "index.html").read_text()
    metrics = json.loads((tmp_path / "x" / "metrics.json").read_text())
    patients = metrics["patients"]
    assert result.n_patients == metrics["n_patients"] == len(patients) == params.explain.n_patients
    assert set(metrics["by_method"]) == {"attention", "grad_attention"}
    assert metrics["by_method"][params.explain.method]["mean_dice"] == metrics["mean_dice"] == result.mean_dice
    assert metrics["mean_dice"] == np.mean([p["dice"] for p in patients])
    assert metrics["pointing_game"] == np.mean([p["pointing_hit"] for p in patients]) == result.pointing_game
    data = trained_tiny["data"]
    for patient in patients:
        row = int(np.flatnonzero(data.arrays["patient_id"] == patient["patient_id"])[0])
        assert data.arrays["split"][row] == "test" and data.arrays["has_lesion_mask"][row]
        assert patient["lesion_voxels"] == int(data.arrays["lesion_mask"][row].sum())
        assert patient["true"] == data.class_names[int(data.arrays["label"][row])]
        assert np.isclose(sum(patient["modality_share"].values()), 1.0)
        assert (tmp_path / "x" / patient["figure"]).is_file()
        assert patient["figure"] in html
