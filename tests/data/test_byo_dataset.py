"""The ``dataset`` params section (issue 13): one place for classes, features and modalities; its defaults are
the built-in cohort's; a dataset's own classes and features are read by ingest; modalities the dataset lacks
cost nothing in the model and are never imputed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from meddiff.config import (
    CohortConfig,
    DatasetConfig,
    Params,
    ParamsError,
    apply_overrides,
    load_params,
    params_from_dict,
)
from meddiff.data.cohort import cohort_provenance, plan_cohort
from meddiff.data.fhir import icd10_class
from meddiff.data.ingest.tables import condition_table, observation_table
from meddiff.data.quarantine import Ledger, Record

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "byo_ehr"


def test_defaults_are_the_built_in_cohort_s_settings() -> None:
    """What ``cohort.classes``/``condition_icd10`` and ``ingest.lab_*``/``icd10_to_class``/``mimic_lab_itemids``
    held before the section existed, value for value and in the same order."""
    dataset = DatasetConfig()
    assert dataset.class_names == ["healthy", "ischemic_stroke", "intracerebral_hemorrhage", "brain_abscess"]
    assert dataset.class_icd10 == {"healthy": "Z03.89", "ischemic_stroke": "I63.9",
                                   "intracerebral_hemorrhage": "I61.9", "brain_abscess": "G06.0"}
    assert dataset.feature_names == ["wbc", "crp", "glucose", "systolic_bp", "inr", "temperature"]
    assert dataset.feature_units == {"wbc": "10*3/uL", "crp": "mg/L", "glucose": "mmol/L", "systolic_bp": "mm[Hg]",
                                     "inr": "{INR}", "temperature": "Cel"}
    assert dataset.feature_ranges == {"wbc": (0.5, 60.0), "crp": (0.0, 500.0), "glucose": (1.0, 45.0),
                                      "systolic_bp": (50.0, 260.0), "inr": (0.5, 10.0), "temperature": (30.0, 44.0)}
    assert dataset.feature_by_loinc == {"6690-2": "wbc", "1988-5": "crp", "2345-7": "glucose", "14749-6": "glucose",
                                        "8480-6": "systolic_bp", "6301-6": "inr", "8310-5": "temperature"}
    assert dataset.feature_by_itemid == {51301: "wbc", 51300: "wbc", 50889: "crp", 50931: "glucose", 51237: "inr"}
    assert dataset.modalities == ["image", "text", "tabular"]
    assert load_params(REPO / "params.yaml").dataset == dataset
    # the class of every code maps as the old prefix map {Z03.89, I63, I61, G06.0} did
    old = {"Z03.89": "healthy", "I63": "ischemic_stroke", "I61": "intracerebral_hemorrhage", "G06.0": "brain_abscess"}
    for code in ("Z03.89", "Z0389", "I63.9", "I634", "i63.50", "I61.9", "I610", "G06.0", "G060", "G06.1", "Q99", "I6"):
        assert icd10_class(code, dataset.icd10_to_class) == icd10_class(code, old), code


def test_cohort_json_lists_the_settings_as_before() -> None:
    """``cohort.json`` is hashed into the ephemeral de-identification key: its settings keep their keys and order."""
    provenance = cohort_provenance(Params())
    settings = CohortConfig().model_dump(mode="json", exclude={"num_workers"})
    assert list(provenance)[:4] == ["n_patients", "classes", "class_prevalence", "condition_icd10"]
    assert list(provenance)[4:] == [k for k in settings if k not in ("n_patients", "class_prevalence")]
    assert provenance["classes"] == DatasetConfig().class_names
    assert provenance["condition_icd10"] == DatasetConfig().class_icd10


@pytest.mark.parametrize(("section", "key"), [
    ({"classes": {"only": {"icd10": ["A00"]}}}, r"dataset: .*classes: at least two classes"),
    ({"classes": {"a": {"icd10": ["A00"]}, "b": {"icd10": ["a00"]}}}, r"classes\.b: ICD-10 code A00 is mapped to 'a'"),
    ({"classes": {"a": {"icd10": ["A00"]}, "b": {"icd10": ["diabetes"]}}}, r"dataset\.classes\.b\.icd10"),
    ({"classes": {"a": {"icd10": []}, "b": {"icd10": ["B00"]}}}, r"dataset\.classes\.a\.icd10"),
    ({"features": {"k": {"unit": "mmol/L", "range": [5.0, 2.0], "loinc": ["2823-3"]}}}, r"dataset\.features\.k"),
    ({"features": {"k": {"unit": "mmol/L", "range": [2.0, 5.0]}}}, r"dataset\.features\.k: .*at least one LOINC"),
    ({"features": {"k": {"unit": "1", "range": [0, 1], "mimic_itemids": [1]},
                   "m": {"unit": "1", "range": [0, 1], "mimic_itemids": [1]}}}, r"features\.m: MIMIC itemid 1"),
    ({"features": {"k": {"unit": "1", "range": [0, 1], "loinc": ["1-1"], "itemids": [1]}}},
     r"dataset\.features\.k\.itemids"),
    ({"modalities": ["ehr"]}, r"dataset\.modalities\.0"),
    ({"modalities": []}, r"dataset\.modalities"),
])
def test_errors_name_the_bad_key(section: dict, key: str) -> None:
    with pytest.raises(ParamsError, match=key):
        params_from_dict({"dataset": section})


def test_the_cohort_needs_one_prevalence_per_class() -> None:
    params = params_from_dict({"dataset": {"classes": {"a": {"icd10": ["A00"]}, "b": {"icd10": ["B00"]}}},
                               "cohort": {"class_prevalence": [0.7, 0.3], "n_patients": 10}})
    plans = plan_cohort(params.cohort, params.dataset.class_names, seed=1)
    assert sorted({p.diagnosis for p in plans}) == ["a", "b"] and sum(p.diagnosis == "a" for p in plans) == 7
    with pytest.raises(ParamsError, match=r"cohort\.class_prevalence has 4 entries but dataset\.classes has 2"):
        plan_cohort(CohortConfig(), params.dataset.class_names, seed=1)


def test_the_example_declares_its_own_dataset_only_in_its_section() -> None:
    params = load_params(EXAMPLE / "params.yaml")
    assert params.dataset.class_names == ["type2_diabetes", "prediabetes"]
    assert params.dataset.feature_names == ["hba1c", "glucose", "triglycerides", "creatinine"]
    assert params.dataset.modalities == ["tabular"]
    assert params.cohort == Params().cohort  # nothing of the synthetic generator is needed


def _records(kind: str, rows: list[dict]) -> list:
    return [(Record(kind, f"{kind}-{i}", "ehr/x.csv"), row, "csv") for i, row in enumerate(rows)]


def test_ingest_reads_the_dataset_s_own_classes_and_features() -> None:
    dataset = load_params(EXAMPLE / "params.yaml").dataset
    ledger = Ledger()
    labs = _records("observation", [
        {"labevent_id": "1", "subject_id": "7", "itemid": "50852", "valuenum": "7.1", "valueuom": "%"},
        {"labevent_id": "2", "subject_id": "7", "itemid": "50931", "valuenum": "140", "valueuom": "mg/dL"},
        {"labevent_id": "3", "subject_id": "7", "itemid": "51221", "valuenum": "41", "valueuom": "%"},
        {"labevent_id": "4", "subject_id": "7", "itemid": "51301", "valuenum": "7", "valueuom": "K/uL"},  # wbc
    ])
    frame = observation_table(labs, dataset, ledger)
    assert [lab if isinstance(lab, str) else None for lab in frame["lab"]] == ["hba1c", "glucose", None, None]
    assert frame["value"].tolist()[:2] == [7.1, 140.0]  # already in the declared units
    assert [c for c in frame.columns if c in dataset.features] == dataset.feature_names
    diagnoses = _records("condition", [
        {"subject_id": "7", "icd_code": "E119", "icd_version": "10"},
        {"subject_id": "8", "icd_code": "R7303", "icd_version": "10"},
        {"subject_id": "8", "icd_code": "I10", "icd_version": "10"},
        {"subject_id": "9", "icd_code": "25000", "icd_version": "9"},
    ])
    labels = condition_table(diagnoses, dataset, ledger)["label"]
    assert [c if isinstance(c, str) else None for c in labels] == ["type2_diabetes", "prediabetes", None, None]


def _ehr_only_model(impute: bool):
    from meddiff.data.dataset import ProcessedDataset
    from meddiff.training.loop import build_model

    rng = np.random.default_rng(0)
    n = 12
    arrays = {
        "label": rng.integers(0, 2, n), "split": np.array(["train"] * n),
        "image": np.zeros((n, 1, 8, 8, 8), np.float16), "token_ids": np.zeros((n, 6), np.int32),
        "token_mask": np.zeros((n, 6), bool), "tabular": rng.normal(size=(n, 4)).astype(np.float32),
        "tabular_missing": np.zeros((n, 4), bool), "modality_present": np.tile([False, False, True], (n, 1)),
    }
    data = ProcessedDataset(arrays, {"class_names": ["a", "b"], "vocab_size": 8})
    params = apply_overrides(Params(), [
        "dataset.modalities=[tabular]", "train.model.d_model=16", "train.model.n_heads=2",
        "train.model.text_heads=2", "train.model.image_channels=[4,8]", "train.diffusion.unet_channels=[8,16]",
        "train.diffusion.num_train_timesteps=20", "train.diffusion.imputation_steps=3",
        f"train.diffusion.impute_missing_latents={str(impute).lower()}",
    ])
    return build_model(data, params), data, params


def test_an_ehr_only_model_never_runs_imaging_or_text(monkeypatch: pytest.MonkeyPatch) -> None:
    from meddiff.data.batches import model_inputs, to_batch
    from meddiff.training.objective import compute_losses

    model, data, params = _ehr_only_model(impute=False)
    assert model.spec.modalities == ("tabular",)
    for part in (model.image_encoder, model.text_encoder, model.image_decoder, model.keyword_decoder):
        monkeypatch.setattr(part, "forward", lambda *args, **kwargs: pytest.fail("a skipped modality ran"))
    batch = to_batch(data, np.arange(len(data)))
    output = model(model_inputs(batch), batch["modality_present"])
    assert output.attention.shape[-1] == 4 + 1  # the EHR features' tokens and the null key, nothing else
    losses = compute_losses(model, batch, output, params.train, None)
    losses.total.backward()
    assert all(p.grad is None for p in model.image_encoder.parameters())
    assert all(p.grad is None for p in model.image_decoder.parameters())


def test_evaluation_never_imputes_what_the_dataset_never_had() -> None:
    from meddiff.evaluation.evaluate import imputation_options
    from meddiff.model.inference import predict_proba

    model, data, _ = _ehr_only_model(impute=True)
    index = np.arange(len(data))
    plain = predict_proba(model, data, index)
    with torch.no_grad():
        imputed = predict_proba(model, data, index, impute_missing=True, seed=3)
    np.testing.assert_allclose(imputed, plain, rtol=0, atol=1e-6)
    assert imputation_options(model) == [False]  # no "with imputation" rows: one modality, nothing to impute


def test_the_make_drop_example_is_deterministic(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("byo_make_drop", EXAMPLE / "make_drop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    counts = module.write_drop(tmp_path / "a", 30, seed=4)
    module.write_drop(tmp_path / "b", 30, seed=4)
    assert sum(counts.values()) == 30 and set(counts) == {"type2_diabetes", "prediabetes"}
    for name in ("patients.csv", "labevents.csv", "diagnoses_icd.csv"):
        assert (tmp_path / "a" / "ehr" / name).read_bytes() == (tmp_path / "b" / "ehr" / name).read_bytes()
    module.write_drop(tmp_path / "new", 5, seed=5, labelled=False)
    assert sorted(p.name for p in (tmp_path / "new" / "ehr").iterdir()) == ["labevents.csv", "patients.csv"]
