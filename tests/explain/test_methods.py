"""The attribution methods on a constructed model whose output depends on known inputs only, and on the
tiny multimodal model (every method, every modality, absent modalities)."""

import numpy as np
import pytest
import torch

from meddiff import MODALITIES
from meddiff.config import ExplainConfig
from meddiff.data.batches import model_inputs, to_batch
from meddiff.explain.attention import attention_rollout
from meddiff.explain.integrated_gradients import explain_integrated_gradients
from meddiff.explain.localisation import pointing_hit, score_map
from meddiff.explain.methods import explain_batch
from meddiff.explain.occlusion import explain_occlusion

from .block_model import SPATIAL, BlockModel, block_mask, block_patients

METHODS = ("attention", "grad_attention", "integrated_gradients", "grad_cam", "occlusion")


@pytest.mark.parametrize("method", ["integrated_gradients", "occlusion"])
def test_image_evidence_in_a_known_block_is_found(method: str) -> None:
    model = BlockModel()
    inputs, present = block_patients()
    if method == "integrated_gradients":
        explained = explain_integrated_gradients(model, inputs, present, n_steps=16)
    else:
        explained = explain_occlusion(model, inputs, present, mask_voxels=2, overlap=0.0)
    lesion = block_mask().numpy()
    assert explained.image.shape == (3, *SPATIAL)
    np.testing.assert_array_equal(explained.predicted, 1)
    for volume in explained.image:
        assert pointing_hit(volume, lesion, tolerance_voxels=0)
        scores = score_map(volume, lesion, np.ones(SPATIAL, bool), 0.5, 0)
        assert scores["dice_topk"] == scores["iou_topk"] == 1.0
        assert (volume[~lesion] == 0).all()  # the output never depends on voxels outside the block
    # the note and the EHR do not enter the output: no relevance, the whole share is the image's
    np.testing.assert_array_equal(explained.text, 0.0)
    np.testing.assert_array_equal(explained.tabular, 0.0)
    np.testing.assert_allclose(explained.modality_share, [[1.0, 0.0, 0.0]] * 3)


def test_integrated_gradients_is_complete_in_probability() -> None:
    """Σ IG = p_c(x) − p_c(baseline) (completeness); here all of it on the block."""
    model = BlockModel()
    inputs, present = block_patients(n=2)
    explained = explain_integrated_gradients(model, inputs, present, n_steps=32)
    baseline = {**inputs, "image": torch.zeros_like(inputs["image"])}
    with torch.no_grad():
        probability = torch.softmax(model(inputs, present).logits, dim=1)[:, 1]
        baseline_probability = torch.softmax(model(baseline, present).logits, dim=1)[:, 1]
    np.testing.assert_allclose(explained.image.sum(axis=(1, 2, 3)), (probability - baseline_probability).numpy(),
                               rtol=1e-3)


def test_integrated_gradients_finds_the_ehr_feature_and_the_note_token() -> None:
    model = BlockModel(image_weight=0.0, tabular_weight=3.0, text_weight=0.5, feature=2, position=1, bias=3.0)
    inputs, present = block_patients()
    explained = explain_integrated_gradients(model, inputs, present, n_steps=16)
    np.testing.assert_array_equal(explained.tabular.argmax(axis=1), 2)
    np.testing.assert_array_equal(explained.text.argmax(axis=1), 1)
    np.testing.assert_array_equal(explained.image, 0.0)
    assert (explained.modality_share[:, 0] == 0).all() and (explained.modality_share[:, 2] > 0.5).all()
    # without the EHR, the EHR gets nothing
    without = present.clone()
    without[:, MODALITIES.index("tabular")] = False
    absent = explain_integrated_gradients(model, inputs, without, n_steps=8)
    np.testing.assert_array_equal(absent.tabular, 0.0)
    np.testing.assert_array_equal(absent.modality_share[:, MODALITIES.index("tabular")], 0.0)


def test_grad_cam_follows_the_block_model_s_feature_map() -> None:
    """The constructed encoder is one 1×1×1 convolution (the channel sum): Grad-CAM's weight is its
    mean gradient, so the map is that weight times the feature map, brightest on the block."""
    model = BlockModel()
    inputs, present = block_patients(n=2)
    with pytest.raises(AttributeError):
        explain_batch(model, inputs, present, "grad_cam", ExplainConfig())  # no text/EHR encoders to read
    from monai.visualize import GradCAM

    from meddiff.explain.views import ImageView

    view = ImageView(model)
    view.hold(inputs, present, 0)
    cam = GradCAM(view, target_layers="model.image_encoder.0", postprocessing=lambda x: x)
    volume = cam(x=inputs["image"][:1].clone().requires_grad_(True), class_idx=1)[0, 0].detach().numpy()
    assert volume.shape == SPATIAL and pointing_hit(volume, block_mask().numpy(), 0)


def test_rollout_rows_are_distributions() -> None:
    layers = tuple(torch.softmax(torch.randn(2, 3, 5, 5), dim=-1) for _ in range(2))
    rollout = attention_rollout(layers)
    torch.testing.assert_close(rollout.sum(-1), torch.ones(2, 5))
    # With uniform attention, each layer is ½·(1/L) + ½·I; two layers compose to their product.
    uniform = torch.full((1, 1, 4, 4), 0.25)
    step = 0.5 * torch.full((4, 4), 0.25) + 0.5 * torch.eye(4)
    torch.testing.assert_close(attention_rollout((uniform, uniform))[0], step @ step)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_the_multimodal_model(method: str, tiny_processed, tiny_params) -> None:
    from meddiff.training.loop import build_model

    _, data = tiny_processed
    torch.manual_seed(0)
    model = build_model(data, tiny_params)
    batch = to_batch(data, np.arange(4))
    present = batch["modality_present"].clone()
    present[:, MODALITIES.index("text")] = False
    present[0, MODALITIES.index("tabular")] = False
    explained = explain_batch(model, model_inputs(batch), present, method, tiny_params.explain)
    spatial = tuple(batch["image"].shape[2:])
    assert explained.image.shape == (4, *spatial)
    assert explained.text.shape == batch["token_ids"].shape and explained.tabular.shape == batch["tabular"].shape
    assert (explained.image >= 0).all() and np.isfinite(explained.image).all()
    np.testing.assert_array_equal(explained.text, 0.0)  # absent note
    np.testing.assert_array_equal(explained.modality_share[:, MODALITIES.index("text")], 0.0)
    np.testing.assert_array_equal(explained.tabular[0], 0.0)
    totals = explained.modality_share.sum(axis=1)
    assert np.all(np.isclose(totals, 1.0) | (totals == 0.0))
    with torch.no_grad():
        logits = model(model_inputs(batch), present).logits
    np.testing.assert_array_equal(explained.predicted, logits.argmax(dim=1).numpy())
    np.testing.assert_allclose(explained.probabilities, torch.softmax(logits, -1).numpy(), rtol=1e-5)

