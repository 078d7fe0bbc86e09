import torch

from meddiff.config import DiffusionConfig, ModelConfig
from meddiff.model.multimodal import MedDiffModel, ModelSpec
from meddiff.training.batches import MODEL_INPUTS, to_batch


def _model(data) -> MedDiffModel:
    spec = ModelSpec(
        n_classes=data.n_classes, n_tabular=data.n_tabular, vocab_size=data.vocab_size, max_note_tokens=12,
        spatial_size=(16, 16, 16),
        model=ModelConfig(d_model=16, n_heads=2, image_channels=[4, 8], text_layers=1, tabular_hidden=16),
        diffusion=DiffusionConfig(num_train_timesteps=20, unet_channels=[8, 16]),
    )
    return MedDiffModel(spec).eval()


def test_shapes(tiny_processed) -> None:
    _, data = tiny_processed
    model = _model(data)
    batch = to_batch(data, list(range(5)))
    out = model({k: batch[k] for k in MODEL_INPUTS}, batch["present"], output_attentions=True)
    assert out.logits.shape == (5, data.n_classes)
    assert out.z.shape == (5, 16)
    n_tokens = 4 * 4 * 4 + 12 + data.n_tabular + 1  # + the null key
    assert out.attention.shape == (5, 2, 3, n_tokens)
    assert out.token_slices["text"] == slice(64, 76)
    assert len(out.text_attentions) == 1


def test_masked_image_has_no_influence(tiny_processed) -> None:
    _, data = tiny_processed
    model = _model(data)
    batch = to_batch(data, list(range(4)))
    inputs = {k: batch[k] for k in MODEL_INPUTS}
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
    inputs = {k: batch[k] for k in MODEL_INPUTS}
    all_used = torch.ones(4, 3, dtype=torch.bool)
    before = text_only(inputs, all_used).logits
    inputs["image"] = torch.rand_like(inputs["image"])
    inputs["tabular"] = torch.randn_like(inputs["tabular"])
    torch.testing.assert_close(before, text_only(inputs, all_used).logits)


def test_concat_fusion_ablation_runs(tiny_processed) -> None:
    from dataclasses import replace

    _, data = tiny_processed
    model = _model(data)
    concat = MedDiffModel(replace(model.spec, model=model.spec.model.model_copy(update={"fusion": "concat"}))).eval()
    batch = to_batch(data, list(range(4)))
    out = concat({k: batch[k] for k in MODEL_INPUTS}, batch["present"])
    assert out.logits.shape == (4, data.n_classes) and out.attention is None
