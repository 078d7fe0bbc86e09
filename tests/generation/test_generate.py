import json

import numpy as np
import pytest
import torch

from meddiff.data.dataset import ProcessedDataset
from meddiff.data.tokenizer import SPECIAL_TOKENS
from meddiff.generation.generate import KEYWORDS_PER_NOTE, _write_records, run_generate
from meddiff.model.inference import encode_latents
from meddiff.model.multimodal import MedDiffModel


def frechet_reference(a: np.ndarray, b: np.ndarray) -> float:
    """‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½) (Heusel et al. 2017), written out with scipy."""
    from scipy.linalg import sqrtm

    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = sqrtm(cov_a @ cov_b).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_generate_samples_decodes_and_measures(trained_tiny, tmp_path) -> None:
    params = trained_tiny["params"]
    data = trained_tiny["data"]
    result = run_generate(
        params, trained_tiny["processed"], trained_tiny["models"], tmp_path / "synthetic", tmp_path / "report"
    )
    config = params.generate
    labels = np.repeat(np.arange(data.n_classes), config.n_per_class)
    assert result.n_patients == len(labels)
    manifest = json.loads((tmp_path / "synthetic" / "manifest.json").read_text())
    assert [m["class"] for m in manifest] == [data.class_names[c] for c in labels]
    assert len(list((tmp_path / "synthetic" / "imaging").glob("*.nii.gz"))) == result.n_patients

    # The saved latents are the seeded class-conditional samples' z, and the metrics are theirs.
    model = MedDiffModel.from_pretrained(trained_tiny["models"])
    saved = np.load(tmp_path / "report" / "latents.npz")
    sampled = model.sample_latents(
        torch.from_numpy(labels), config.num_inference_steps, config.guidance_scale,
        torch.Generator().manual_seed(params.seed),
    )
    np.testing.assert_array_equal(saved["synthetic"], sampled.z.numpy())
    np.testing.assert_array_equal(saved["synthetic_labels"], labels)
    np.testing.assert_array_equal(saved["real_test"], encode_latents(model, data, data.indices("test")))
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    with torch.no_grad():
        predicted = model.classify_latent(torch.from_numpy(saved["synthetic"])).argmax(dim=1).numpy()
    assert metrics["class_agreement"] == result.class_agreement == float((predicted == labels).mean())
    assert metrics["class_agreement_per_class"] == {
        name: float((predicted[labels == c] == c).mean()) for c, name in enumerate(data.class_names)
    }
    assert metrics["frechet_distance"] == pytest.approx(frechet_reference(saved["synthetic"], saved["real_test"]),
                                                        rel=1e-6)


def test_records_decode_to_original_units_and_skip_special_tokens(tiny_processed, tiny_params, tmp_path) -> None:
    from meddiff.training.loop import build_model

    _, data = tiny_processed
    torch.manual_seed(0)
    model = build_model(data, tiny_params).eval()
    vocabulary = {i: SPECIAL_TOKENS[i] if i < len(SPECIAL_TOKENS) else f"word{i}" for i in range(data.vocab_size)}
    with torch.no_grad():  # every special token outranks every word; words rank by id
        model.keyword_decoder.head.weight.zero_()
        model.keyword_decoder.head.bias.copy_(-torch.arange(data.vocab_size, dtype=torch.float32))
        model.keyword_decoder.head.bias[: len(SPECIAL_TOKENS)] = 10.0
    meta = {**data.meta, "tabular_features": [
        {"name": f"lab{i}", "unit": "mmol/L", "mean": 10.0 * i, "std": 2.0} for i in range(data.n_tabular)
    ]}
    z = np.random.default_rng(0).normal(size=(2, model.spec.model.d_model)).astype(np.float32)
    out = tmp_path / "records"
    out.mkdir()
    _write_records(model, z, np.array([1, 3]), ProcessedDataset(data.arrays, meta, vocabulary), out)

    words = [f"word{i}" for i in range(len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + KEYWORDS_PER_NOTE)]
    note = (out / "notes" / "synthetic-00000.txt").read_text()
    assert note == "Findings (synthetic, key terms): " + ", ".join(words) + "\n"
    with torch.no_grad():
        standardised = model.tabular_decoder(torch.from_numpy(z)).numpy()
    observations = [json.loads(line) for line in (out / "Observation.ndjson").read_text().splitlines()]
    first = [o for o in observations if o["subject"]["reference"] == "Patient/synthetic-00000"]
    assert [o["valueQuantity"]["value"] for o in first] == [
        round(float(standardised[0, i] * 2.0 + 10.0 * i), 3) for i in range(data.n_tabular)
    ]
    assert {o["valueQuantity"]["unit"] for o in observations} == {"mmol/L"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == [{"patient_id": "synthetic-00000", "class": data.class_names[1]},
                        {"patient_id": "synthetic-00001", "class": data.class_names[3]}]
