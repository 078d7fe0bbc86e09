"""Issue 13, "their own dataset, as it is": an EHR-only, single-site MIMIC-style drop with its own two classes and
four labs, declared only in the ``dataset`` section (examples/byo_ehr/params.yaml), through every stage of the CLI:
ingest → preprocess → train → evaluate → promote → generate → explain → predict. Stages that do not apply to an
EHR-only model (explain: nothing to localise) say so and exit 0; evaluation neither imputes nor masks a modality
the data never had."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from meddiff.cli import main

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "byo_ehr"
#: tiny: the whole pipeline in well under a minute on 2 cores
TINY = [
    "train.epochs=2", "train.batch_size=16", "train.model.d_model=16", "train.model.n_heads=2",
    "train.model.text_heads=2", "train.model.tabular_hidden=16", "train.model.image_channels=[4,8]",
    "train.diffusion.unet_channels=[8,16]", "train.diffusion.num_train_timesteps=20",
    "train.diffusion.refine_epochs=1", "train.diffusion.imputation_steps=2",
    "train.diffusion.impute_missing_latents=true",  # on, and still nothing is imputed: the data have one modality
    "evaluate.n_repeats=1", "evaluate.n_bootstrap=20", "generate.n_per_class=3", "generate.num_inference_steps=3",
    "generate.n_bootstrap=20",
]
N_PATIENTS, N_NEW = 60, 6


def make_drop(out: Path, n: int, seed: int, labelled: bool) -> dict[str, int]:
    spec = importlib.util.spec_from_file_location("byo_make_drop", EXAMPLE / "make_drop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_drop(out, n, seed, labelled=labelled)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example's drop and params in a fresh folder, every stage run there once; the folder."""
    root = tmp_path_factory.mktemp("byo_ehr")
    make_drop(root / "data" / "byo_ehr" / "raw", N_PATIENTS, seed=0, labelled=True)
    make_drop(root / "data" / "byo_ehr" / "raw_new", N_NEW, seed=1, labelled=False)
    params = yaml.safe_load((EXAMPLE / "params.yaml").read_text())
    params["tracking"] = {"tracking_uri": f"sqlite:///{root / 'mlruns.db'}", "artifact_location": str(root / "mlart")}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.chdir(root)
    monkeypatch.setenv("MEDDIFF_DEID_KEY", "byo-ehr-test-key-0123456789abcdef")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = [item for pair in (("--set", o) for o in TINY) for item in pair]
    try:
        for stage in ("ingest", "preprocess", "train", "evaluate", "promote", "generate", "explain", "predict"):
            assert main([stage, "--params", "params.yaml", *overrides]) == 0, stage
    finally:
        monkeypatch.undo()
    return root


def test_ingest_and_preprocess_read_the_declared_classes_and_features(run: Path) -> None:
    validation = json.loads((run / "reports/byo_ehr/ingest/validation.json").read_text())
    # what the drop has that nothing maps (hematocrit, hypertension, ICD-9) is quarantined; the patients stay
    assert validation["quarantined_by_reason"]["unknown_code"] > 0
    meta = json.loads((run / "data/byo_ehr/processed/meta.json").read_text())
    assert meta["class_names"] == ["type2_diabetes", "prediabetes"]
    names = [f["name"] for f in meta["tabular_features"]]
    assert names[:4] == ["hba1c", "glucose", "triglycerides", "creatinine"]
    assert sum(meta["split_counts"].values()) == N_PATIENTS


def test_the_model_is_built_for_the_ehr_alone(run: Path) -> None:
    spec = json.loads((run / "models/byo_ehr/model_spec.json").read_text())
    assert spec["modalities"] == ["tabular"] and spec["n_classes"] == 2


def test_evaluation_neither_imputes_nor_masks_what_the_data_never_had(run: Path) -> None:
    metrics = json.loads((run / "reports/byo_ehr/evaluate/metrics.json").read_text())
    assert metrics["subgroup"]["applicable"] is False  # one site
    with open(run / "reports/byo_ehr/evaluate/robustness.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["imputation"] for row in rows} == {"False"}
    unmasked = next(r for r in rows if r["scenario"] == "random" and float(r["masking_rate"]) == 0.0)["auc_macro"]
    for row in rows:
        if row["scenario"] == "random" and float(row["masking_rate"]) > 0:
            assert float(row["masked_fraction"]) == 0.0 and row["note"].startswith("nothing to mask")
            assert row["auc_macro"] == unmasked
        if row["scenario"] in ("subset_image", "subset_text", "subset_image+text"):
            assert row["n_patients"] == "0" and row["note"]
        if row["scenario"] in ("subset_image+tabular", "subset_text+tabular"):
            assert row["note"].startswith("no test patient has") and row["auc_macro"] == unmasked


def test_promote_generate_explain_and_predict(run: Path) -> None:
    decision = json.loads((run / "reports/byo_ehr/promote/decision.json").read_text())
    assert decision["promoted"] is True
    synthetic = run / "data/byo_ehr/synthetic"
    assert not any((synthetic / "imaging").iterdir())  # an EHR-only model writes no CT series
    observations = [json.loads(line) for line in (synthetic / "ehr/Observation.ndjson").read_text().splitlines()]
    codes = {o["code"]["coding"][0]["code"] for o in observations}
    assert codes <= {"4548-4", "2345-7", "2571-8", "2160-0"} and codes
    conditions = [json.loads(line) for line in (synthetic / "ehr/Condition.ndjson").read_text().splitlines()]
    assert {c["code"]["coding"][0]["code"] for c in conditions} == {"E11", "R73.03"}
    explain = json.loads((run / "reports/byo_ehr/explain/metrics.json").read_text())
    assert explain["applicable"] is False and "no image modality" in explain["reason"]
    with open(run / "reports/byo_ehr/predict/predictions.csv", newline="") as handle:
        predictions = list(csv.DictReader(handle))
    assert len(predictions) == N_NEW
    for row in predictions:
        assert abs(float(row["p_type2_diabetes"]) + float(row["p_prediabetes"]) - 1.0) < 1e-5
        assert (row["has_image"], row["has_text"], row["has_tabular"]) == ("0", "0", "1")
