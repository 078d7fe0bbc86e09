import json

import numpy as np
import pytest
import torch

from meddiff.config import DiffusionConfig, ModelConfig
from meddiff.data.batches import model_inputs, to_batch
from meddiff.model.multimodal import SPEC_FILE, WEIGHTS_FILE, MedDiffModel, ModelSpec


def _model(data, image_pooling: str = "max") -> MedDiffModel:
    spec = ModelSpec(
        n_classes=data.n_classes, n_tabular=data.n_tabular, vocab_size=data.vocab_size, max_note_tokens=12,
        spatial_size=(16, 16, 16),
        model=ModelConfig(d_model=16, n_heads=2, image_channels=[4, 8], text_layers=1, tabular_hidden=16,
                          image_pooling=image_pooling),
        diffusion=DiffusionConfig(num_train_timesteps=20, unet_channels=[8, 16]),
        image_segmentation=image_pooling == "lesion",
    )
    return MedDiffModel(spec).eval()


def test_shapes(tiny_processed) -> None:
    _, data = tiny_processed
    model = _model(data)
    batch = to_batch(data, list(range(5)))
    out = model(model_inputs(batch), batch["modality_present"], output_attentions=True)
    assert out.logits.shape == (5, data.n_classes)
    assert out.z.shape == (5, 16)
    n_image = 8 * 8 * 8  # region tokens on the half grid (model.image_encoder.grid)
    assert model.image_encoder.grid == (8, 8, 8)
    n_tokens = n_image + 12 + data.n_tabular + 1  # + the null key
    assert out.attention.shape == (5, 2, 3, n_tokens)
    assert out.token_slices["text"] == slice(n_image, n_image + 12)
    assert len(out.text_attentions) == 1


@pytest.mark.parametrize("image_pooling", ["max", "lesion"])
def test_masked_image_has_no_influence(tiny_processed, image_pooling: str) -> None:
    _, data = tiny_processed
    model = _model(data, image_pooling)
    batch = to_batch(data, list(range(4)))
    inputs = model_inputs(batch)
    used = torch.tensor([[False, True, True]] * 4)
    before = model(inputs, used).logits
    inputs["image"] = torch.rand_like(inputs["image"])
    torch.testing.assert_close(before, model(inputs, used).logits)
    used_image = torch.ones(4, 3, dtype=torch.bool)
    assert not torch.allclose(model(inputs, used_image).logits, before)


def test_ontology_bias_reaches_matching_note_tokens(tiny_processed) -> None:
    from meddiff.model.ontology import token_term_index

    _, data = tiny_processed
    model = _model(data)
    vocabulary = {5: "hemorrhage", 6: "the", 7: "infarct"}
    model.set_token_terms(token_term_index(vocabulary, data.vocab_size))
    with torch.no_grad():
        model.term_bias.fill_(2.5)
    bias = model.ontology_bias(torch.tensor([[2, 5, 6, 7, 0]]))
    assert bias.tolist() == [[0.0, 2.5, 0.0, 2.5, 0.0]]
    assert "token_term" in model.state_dict()  # the mapping travels with the weights


def test_unimodal_model_ignores_other_modalities(tiny_processed) -> None:
    from dataclasses import replace

    _, data = tiny_processed
    model = _model(data)
    text_only = MedDiffModel(replace(model.spec, modalities=("text",))).eval()
    batch = to_batch(data, list(range(4)))
    inputs = model_inputs(batch)
    all_used = torch.ones(4, 3, dtype=torch.bool)
    before = text_only(inputs, all_used).logits
    inputs["image"] = torch.rand_like(inputs["image"])
    inputs["tabular"] = torch.randn_like(inputs["tabular"])
    torch.testing.assert_close(before, text_only(inputs, all_used).logits)


def test_concat_fusion_ablation_ignores_absent_modalities(tiny_processed) -> None:
    from dataclasses import replace

    _, data = tiny_processed
    model = _model(data)
    concat = MedDiffModel(replace(model.spec, model=model.spec.model.model_copy(update={"fusion": "concat"}))).eval()
    batch = to_batch(data, list(range(4)))
    inputs = model_inputs(batch)
    no_text = torch.tensor([[True, False, True]] * 4)
    out = concat(inputs, no_text)
    assert out.logits.shape == (4, data.n_classes) and out.attention is None
    inputs["token_ids"] = torch.randint(4, data.vocab_size, inputs["token_ids"].shape)
    torch.testing.assert_close(concat(inputs, no_text).logits, out.logits)
    assert not torch.allclose(concat(inputs, torch.ones(4, 3, dtype=torch.bool)).logits, out.logits)


def test_save_pretrained_round_trip(tiny_processed, tmp_path) -> None:
    _, data = tiny_processed
    torch.manual_seed(3)
    model = _model(data)
    weights = model.save_pretrained(tmp_path / "m")
    assert weights == tmp_path / "m" / WEIGHTS_FILE
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == sorted([WEIGHTS_FILE, SPEC_FILE])
    # The on-disk format: a plain state dict (loadable with weights_only) and the spec as JSON.
    state = torch.load(weights, weights_only=True)
    assert state.keys() == model.state_dict().keys()
    assert json.loads((tmp_path / "m" / SPEC_FILE).read_text()) == model.spec.to_dict()
    loaded = MedDiffModel.from_pretrained(tmp_path / "m")
    assert loaded.spec == model.spec and not loaded.training
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    batch = to_batch(data, np.arange(4))
    torch.testing.assert_close(
        loaded(model_inputs(batch), batch["modality_present"]).logits,
        model(model_inputs(batch), batch["modality_present"]).logits, rtol=0, atol=0,
    )
    with pytest.raises(FileNotFoundError, match="meddiff train"):
        MedDiffModel.from_pretrained(tmp_path / "absent")


def test_pyfunc_serves_the_saved_model(tiny_processed, tmp_path) -> None:
    from types import SimpleNamespace

    from meddiff.model.inference import predict_proba
    from meddiff.model.pyfunc import MedDiffPyfunc

    _, data = tiny_processed
    model = _model(data)
    model.save_pretrained(tmp_path / "m")
    served = MedDiffPyfunc()
    served.load_context(SimpleNamespace(artifacts={"model_dir": str(tmp_path / "m")}))
    index = np.arange(6)
    arrays = data.arrays
    raw = {name: arrays[name][index] for name in ("image", "token_ids", "token_mask", "tabular", "tabular_missing")}
    present = arrays["modality_present"][index].copy()
    present[0, 0] = False  # the request's presence mask decides, not the data's
    probs = served.predict(None, {**raw, "modality_present": present})
    np.testing.assert_allclose(probs, predict_proba(model, data, index, present), rtol=0, atol=1e-6)


def test_imputation_keeps_present_latents_and_fills_absent_ones(tiny_processed) -> None:
    _, data = tiny_processed
    model = _model(data)
    latents = torch.randn(3, 3, 16)
    present = torch.tensor([[True, False, True], [False, True, True], [True, True, True]])
    filled = model.impute_latents(latents, present, torch.Generator().manual_seed(0))
    torch.testing.assert_close(filled[present], latents[present], rtol=0, atol=0)
    assert not torch.allclose(filled[~present], latents[~present])
    again = model.impute_latents(latents, present, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, filled, rtol=0, atol=0)


def test_lesion_logits_come_out_for_every_image_masked_or_not(tiny_processed, tmp_path) -> None:
    _, data = tiny_processed
    model = _model(data, "lesion")
    batch = to_batch(data, np.arange(3))
    hidden = torch.tensor([[False, True, True]] * 3)
    out = model(model_inputs(batch), hidden)
    assert out.lesion_logits is not None and out.lesion_logits.shape == (3, 1, 16, 16, 16)
    assert _model(data)(model_inputs(batch), hidden).lesion_logits is None, "no seg head, no logits"
    model.save_pretrained(tmp_path)
    loaded = MedDiffModel.from_pretrained(tmp_path)
    assert loaded.spec.image_segmentation and loaded.image_encoder.segmentation_head is not None
    torch.testing.assert_close(loaded(model_inputs(batch), hidden).lesion_logits, out.lesion_logits)
