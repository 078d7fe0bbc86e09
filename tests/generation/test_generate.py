"""The generate stage end to end on the tiny trained model: seeded samples, their measures (recomputed here),
the exported drop (FHIR validity, dciodvfy) and the round trip through ``meddiff ingest``."""

import base64
import json
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from meddiff.config import apply_overrides
from meddiff.data.deid import Pseudonymizer
from meddiff.data.ingest import run_ingest
from meddiff.generation.export import SYNTHETIC_TAG
from meddiff.generation.generate import decode, run_generate
from meddiff.generation.privacy import privacy_report
from meddiff.generation.utility import augmentation_report, tstr_report
from meddiff.model.inference import encode_latents
from meddiff.model.multimodal import MedDiffModel

CLASS_NAMES = ["healthy", "disease_a", "disease_b", "rare_c"]  # tests/conftest.py
ICD10 = {"healthy": "Z03.89", "disease_a": "I63.9", "disease_b": "I61.9", "rare_c": "G06.0"}
#: the tiny set's five tabular columns, named as preprocess names them, with realistic scaler statistics
FEATURES = [
    {"name": "wbc", "unit": "10*3/uL", "mean": 8.0, "std": 2.0, "median": 8.0},
    {"name": "crp", "unit": "mg/L", "mean": 9.0, "std": 6.0, "median": 6.0},
    {"name": "glucose", "unit": "mmol/L", "mean": 6.2, "std": 1.5, "median": 6.0},
    {"name": "age", "unit": "a", "mean": 62.0, "std": 15.0, "median": 63.0},
    {"name": "sex_male", "unit": "1", "mean": 0.5, "std": 0.5, "median": 1.0},
]
DEID_KEY = "a-long-enough-secret-for-the-round-trip"


def frechet_reference(a: np.ndarray, b: np.ndarray) -> float:
    """‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½) (Heusel et al. 2017), written out with scipy."""
    from scipy.linalg import sqrtm

    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = sqrtm(cov_a @ cov_b).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


@pytest.fixture(scope="module")
def generated(trained_tiny, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("generate")
    processed = root / "processed"
    shutil.copytree(trained_tiny["processed"], processed)
    meta = json.loads((processed / "meta.json").read_text())
    (processed / "meta.json").write_text(json.dumps({**meta, "tabular_features": FEATURES}))
    params = apply_overrides(trained_tiny["params"], [
        "dataset.classes={" + ",".join(f"{k}: {{icd10: [{v}]}}" for k, v in ICD10.items()) + "}",
        "cohort.class_prevalence=[0.4,0.25,0.25,0.1]",
        "ingest.num_workers=1",
        "generate.rare_classes=[rare_c]",
    ])
    result = run_generate(params, processed, trained_tiny["models"], root / "synthetic", root / "report")
    assert trained_tiny["data"].class_names == CLASS_NAMES
    labels = np.repeat(np.arange(len(CLASS_NAMES)), params.generate.n_per_class)
    return {"root": root, "params": params, "processed": processed, "result": result, "labels": labels,
            "data": trained_tiny["data"], "models": trained_tiny["models"]}


def ndjson(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_samples_and_measures(generated) -> None:
    params, data, labels, root = generated["params"], generated["data"], generated["labels"], generated["root"]
    config = params.generate
    result = generated["result"]
    assert result.n_patients == len(labels)

    # The saved latents are the seeded class-conditional samples' z, and the metrics are theirs.
    model = MedDiffModel.from_pretrained(generated["models"])
    saved = np.load(root / "report" / "latents.npz")
    sampled = model.sample_latents(
        torch.from_numpy(labels), config.num_inference_steps, config.guidance_scale,
        torch.Generator().manual_seed(params.seed),
    )
    np.testing.assert_array_equal(saved["synthetic"], sampled.z.numpy())
    np.testing.assert_array_equal(saved["synthetic_labels"], labels)
    real = {s: encode_latents(model, data, data.indices(s)) for s in ("train", "val", "test")}
    np.testing.assert_array_equal(saved["real_test"], real["test"])
    metrics = json.loads((root / "report" / "metrics.json").read_text())
    with torch.no_grad():
        predicted = model.classify_latent(torch.from_numpy(saved["synthetic"])).argmax(dim=1).numpy()
    assert metrics["class_agreement"] == result.class_agreement == float((predicted == labels).mean())
    assert metrics["class_agreement_per_class"] == {
        name: float((predicted[labels == c] == c).mean()) for c, name in enumerate(data.class_names)
    }
    assert metrics["n_per_class"] == dict.fromkeys(CLASS_NAMES, config.n_per_class)
    assert metrics["frechet_distance_class_balanced"] == pytest.approx(
        frechet_reference(saved["synthetic"], saved["real_test"]), rel=1e-6)
    assert metrics["frechet_distance_real_floor"] == pytest.approx(frechet_reference(real["val"], real["test"]),
                                                                   rel=1e-6)
    with torch.no_grad():
        predicted_real = model.classify_latent(torch.from_numpy(real["test"])).argmax(dim=1).numpy()
    test_y = data.arrays["label"][data.indices("test")]
    assert metrics["class_agreement_real_per_class"] == {
        name: float((predicted_real[test_y == c] == c).mean()) for c, name in enumerate(data.class_names)
    }

    # Quality sets: as many patients as the validation split, classes at the training prevalence, sampled after
    # the exported set from the same generator; the headline distance is their mean.
    draws, draw_labels = saved["quality_draws"], saved["quality_draw_labels"]
    assert draws.shape == (config.n_quality_draws, len(real["val"]), real["val"].shape[1])
    generator = torch.Generator().manual_seed(params.seed)
    model.sample_latents(torch.from_numpy(labels), config.num_inference_steps, config.guidance_scale, generator)
    first = model.sample_latents(torch.from_numpy(draw_labels[0]), config.num_inference_steps,
                                 config.guidance_scale, generator)
    np.testing.assert_array_equal(draws[0], first.z.numpy())
    distances = [frechet_reference(d, real["test"]) for d in draws]
    assert metrics["frechet_distance"] == pytest.approx(np.mean(distances), rel=1e-6)
    assert metrics["frechet_distance_draws"]["max"] == pytest.approx(max(distances), rel=1e-6)
    assert set(metrics["precision_recall"]) == {"k", "precision", "recall", "real_floor"}
    precision = metrics["precision_recall"]["precision"]
    assert 0.0 <= precision["min"] <= precision["mean"] <= precision["max"] <= 1.0
    fid = metrics["image_fid_25d"]["meddiff image encoder"]
    assert set(fid) == {"sagittal", "coronal", "axial"}
    assert all(plane["fid"] > 0 and plane["real_floor"] > 0 for plane in fid.values())

    # privacy in the latent space and TSTR, recomputed from the latents
    held_out = np.concatenate([real["val"], real["test"]])
    expected = privacy_report("fused latent z", saved["synthetic"], real["train"], held_out,
                              [f"synthetic-{i:05d}" for i in range(len(labels))],
                              list(data.arrays["patient_id"][data.indices("train")]), config.n_closest_pairs,
                              config.n_bootstrap, params.seed)
    summary = expected.summary()
    interval = summary.pop("membership_inference_auc_interval")
    assert metrics["privacy"]["fused latent z"].pop("membership_inference_auc_interval") == pytest.approx(interval)
    assert interval["ci_low"] <= expected.membership_inference_auc <= interval["ci_high"]
    assert metrics["privacy"]["fused latent z"] == pytest.approx(summary)
    assert result.membership_inference_auc_latent == expected.membership_inference_auc
    train_y = data.arrays["label"][data.indices("train")]
    tstr = tstr_report(saved["synthetic"], labels, real["train"], train_y, real["test"], test_y, data.n_classes,
                       config.n_bootstrap, params.seed)
    assert metrics["tstr"] == json.loads(json.dumps(tstr))  # JSON keeps floats exactly
    # rare-class augmentation: the real training latents ± the exported rare_c patients, scored on real test
    rare = CLASS_NAMES.index("rare_c")
    augmentation = augmentation_report(real["train"], train_y, saved["synthetic"][labels == rare], rare, real["test"],
                                       test_y, data.n_classes, config.n_bootstrap, params.seed)
    assert metrics["rare_augmentation"] == {"rare_c": {"evaluated_on": "test split",
                                                       **json.loads(json.dumps(augmentation))}}
    assert metrics["rare_augmentation"]["rare_c"]["n_synthetic_added"] == config.n_per_class
    assert metrics["differential_privacy"] == {"enabled": False}
    train_images = data.arrays["modality_present"][data.indices("train"), 0]
    assert metrics["privacy"]["image"]["n_train"] == int(train_images.sum())
    pairs = json.loads((root / "report" / "privacy_pairs.json").read_text())
    assert [p["distance"] for p in pairs["fused latent z"]] == pytest.approx(
        [p.distance for p in expected.closest_pairs])


def test_data_card_is_written_to_the_report_and_the_drop(generated) -> None:
    root = generated["root"]
    card = (root / "report" / "data_card.md").read_text()
    assert (root / "synthetic" / "README.md").read_text() == card
    assert "Synthetic — not for clinical use" in card
    assert "| rare_c | 3 |" in card and "membership-inference AUC" in card and "TSTR" in card
    assert "## Rare-class augmentation" in card and "| rare_c | test split (" in card
    assert "Differential privacy: none" in card


def test_exported_resources_validate_and_observations_are_decoded_labs(generated, fhir_model) -> None:
    synthetic, data = generated["root"] / "synthetic", generated["data"]
    counts = Counter()
    for kind in ("Patient", "Observation", "Condition", "DocumentReference"):
        for resource in ndjson(synthetic / "ehr" / f"{kind}.ndjson"):
            fhir_model(kind).model_validate(resource)
            assert SYNTHETIC_TAG in resource["meta"]["tag"]
            counts[kind] += 1
    n = len(generated["labels"])
    assert counts == {"Patient": n, "Observation": 3 * n, "Condition": n, "DocumentReference": n}

    # Observation values are the tabular decoder's output in original units (inverted scaler), 2 decimals
    model = MedDiffModel.from_pretrained(generated["models"])
    z = np.load(generated["root"] / "report" / "latents.npz")["synthetic"]
    _, tabular, _ = decode(model, z, type(data)(data.arrays, {**data.meta, "tabular_features": FEATURES}))
    with torch.no_grad():
        standardised = model.tabular_decoder(torch.from_numpy(z)).numpy()
    np.testing.assert_allclose(tabular, standardised * [f["std"] for f in FEATURES] + [f["mean"] for f in FEATURES],
                               rtol=1e-5)
    ranges = generated["params"].dataset.feature_ranges
    first = {o["id"]: o["valueQuantity"]["value"] for o in ndjson(synthetic / "ehr" / "Observation.ndjson")}
    for column, lab in enumerate(("wbc", "crp", "glucose")):
        assert first[f"synthetic-00000-{lab}"] == round(float(np.clip(tabular[0, column], *ranges[lab])), 2)
    notes = [base64.b64decode(d["content"][0]["attachment"]["data"]).decode()
             for d in ndjson(synthetic / "ehr" / "DocumentReference.ndjson")]
    assert all(note.startswith("SYNTHETIC - NOT FOR CLINICAL USE.") for note in notes)


def test_dciodvfy_reports_no_errors_on_exported_series(generated, dciodvfy) -> None:
    files = sorted((generated["root"] / "synthetic" / "imaging").rglob("*.dcm"))
    assert len(files) == len(generated["labels"]) * generated["data"].arrays["image"].shape[-1]
    for path in files[:: max(1, len(files) // 6)]:
        completed = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
        output = completed.stdout + completed.stderr
        assert "Error" not in output, output


def test_ingest_accepts_every_synthetic_patient_with_its_sampled_class(generated, monkeypatch) -> None:
    monkeypatch.setenv("MEDDIFF_DEID_KEY", DEID_KEY)
    root, params, labels = generated["root"], generated["params"], generated["labels"]
    result = run_ingest(params, root / "synthetic", root / "interim", root / "quarantine", root / "ingest_report")
    assert result.quarantined == 0, result.quarantined_by_reason
    manifest = pd.read_parquet(result.manifest)
    assert len(manifest) == result.n_patients == len(labels)  # 100 % of the synthetic patients
    pseudonym = Pseudonymizer(DEID_KEY.encode(), params.ingest.deid_max_date_shift_days).pseudonym
    expected = {pseudonym(f"synthetic-{i:05d}"): CLASS_NAMES[c] for i, c in enumerate(labels)}
    assert dict(zip(manifest["patient_id"], manifest["label"], strict=True)) == expected
    assert manifest[["has_image", "has_note", "has_labs"]].all().all()
    assert set(manifest["site"]) == {"meddiff-synthetic"}
    assert set(manifest["sex"]) <= {"male", "female"} and manifest["age"].notna().all()


def test_data_card_states_the_dp_guarantee_and_what_it_covers() -> None:
    from meddiff.generation.data_card import _dp_lines

    line = _dp_lines({"enabled": True, "epsilon": 9.87, "delta": 1 / 259, "noise_multiplier": 2.5,
                      "max_grad_norm": 1.0, "sample_rate": 32 / 259, "steps": 3200, "accountant": "RDP (opacus)",
                      "covers": "the U-Net's refinement, not the encoders"})[0]
    assert "ε = 9.87 at δ = 0.0039" in line and "3200 steps" in line and "not the encoders" in line
