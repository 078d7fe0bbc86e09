"""Apply mode: ingest admits unlabelled patients, preprocess reuses the fitted artefacts and never refits,
and the drops of new and external patients the cohort generator writes beside the training data."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pytest

from meddiff.config import Params, apply_overrides
from meddiff.data.cohort_drops import MALFORMED_PATIENT_FAULT, generate_drop, generate_new_patients
from meddiff.data.dataset import (
    APPLY_SPLIT,
    PREPROCESSING_FILES,
    UNKNOWN_LABEL,
    copy_preprocessing_artefacts,
    load_processed,
)
from meddiff.data.ingest import MANIFEST_FILE, run_ingest
from meddiff.data.preprocess import run_preprocess_apply

if TYPE_CHECKING:
    from tests.data.conftest import Pipeline

#: every array preprocess derives from a patient's own data (split differs by design in apply mode)
PATIENT_ARRAYS = ("patient_id", "label", "site", "image", "lesion_mask", "has_lesion_mask", "token_ids",
                  "token_mask", "tabular", "tabular_missing", "modality_present")


def _digests(folder: Path) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in PREPROCESSING_FILES}


def _interim_of(pipeline: Pipeline, target: Path, rows: pd.DataFrame) -> Path:
    """An interim folder holding ``rows`` of the pipeline's manifest (images and masks linked, not copied)."""
    target.mkdir()
    for sub in ("images", "masks"):
        (target / sub).symlink_to(pipeline.interim / sub)
    rows.to_parquet(target / MANIFEST_FILE, index=False)
    return target


def test_apply_mode_reproduces_fit_mode_on_the_test_patients_and_never_refits(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    fitted = load_processed(pipeline.processed)
    artefacts = tmp_path / "model" / "preprocessing"
    assert copy_preprocessing_artefacts(pipeline.processed, artefacts) == list(PREPROCESSING_FILES)
    before = _digests(artefacts)
    test_ids = set(fitted.arrays["patient_id"][fitted.indices("test")])
    manifest = pd.read_parquet(pipeline.interim / MANIFEST_FILE)
    interim = _interim_of(pipeline, tmp_path / "interim", manifest[manifest.patient_id.isin(test_ids)])
    # today's params differ from the fitted ones: apply mode must follow the artefacts, not params.yaml
    changed = apply_overrides(pipeline.params, ["preprocess.vocab_size=50", "preprocess.spatial_size=[8,8,8]",
                                                "preprocess.max_note_tokens=8"])
    result = run_preprocess_apply(changed, interim, artefacts, tmp_path / "processed", tmp_path / "report")

    assert _digests(artefacts) == before and sorted(p.name for p in artefacts.iterdir()) == sorted(PREPROCESSING_FILES)
    applied = load_processed(tmp_path / "processed")
    assert result.n_patients == len(applied) == len(test_ids)
    assert set(applied.arrays["split"]) == {APPLY_SPLIT}
    order = {pid: i for i, pid in enumerate(fitted.arrays["patient_id"])}
    rows = np.array([order[pid] for pid in applied.arrays["patient_id"]])
    for name in PATIENT_ARRAYS:
        np.testing.assert_array_equal(applied.arrays[name], fitted.arrays[name][rows], err_msg=name)
    assert applied.meta["class_names"] == fitted.meta["class_names"]
    assert applied.meta["tabular_features"] == fitted.meta["tabular_features"]
    assert applied.vocabulary == fitted.vocabulary


def test_apply_mode_takes_unlabelled_patients_and_missing_labs(pipeline: Pipeline, tmp_path: Path) -> None:
    fitted = load_processed(pipeline.processed)
    copy_preprocessing_artefacts(pipeline.processed, tmp_path / "artefacts")
    manifest = pd.read_parquet(pipeline.interim / MANIFEST_FILE)
    lab = json.loads((pipeline.processed / "meta.json").read_text())["tabular_features"][0]["name"]
    unlabelled = manifest.assign(label=None).drop(columns=[lab])
    interim = _interim_of(pipeline, tmp_path / "interim", unlabelled)
    run_preprocess_apply(pipeline.params, interim, tmp_path / "artefacts", tmp_path / "processed")
    applied = load_processed(tmp_path / "processed")
    assert (applied.arrays["label"] == UNKNOWN_LABEL).all()
    assert applied.arrays["tabular_missing"][:, 0].all()
    median, mean, std = (fitted.meta["tabular_features"][0][k] for k in ("median", "mean", "std"))
    np.testing.assert_allclose(applied.arrays["tabular"][:, 0], np.float32((median - mean) / std))


def test_apply_mode_needs_the_artefacts(pipeline: Pipeline, tmp_path: Path) -> None:
    (tmp_path / "artefacts").mkdir()
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        run_preprocess_apply(pipeline.params, pipeline.interim, tmp_path / "artefacts", tmp_path / "processed")


@pytest.fixture(scope="module")
def new_patients(tiny_params: Params, tmp_path_factory: pytest.TempPathFactory) -> tuple[Params, Path]:
    params = apply_overrides(tiny_params, ["drops.new_patients.n_patients=10"])
    raw = tmp_path_factory.mktemp("drops") / "raw_new"
    generate_new_patients(params, raw)
    return params, raw


def test_new_patients_drop_is_unlabelled_with_one_malformed_patient(new_patients: tuple[Params, Path]) -> None:
    params, raw = new_patients
    provenance = json.loads((raw / "cohort.json").read_text())
    assert not (raw / "ehr" / "Condition.ndjson").exists()
    ids = [json.loads(line)["id"] for line in (raw / "ehr" / "Patient.ndjson").read_text().splitlines()]
    assert len(ids) == 10 and all(pid.startswith("NEW") for pid in ids)
    assert [entry["patient_id"] for entry in provenance["ground_truth"]] == ids
    assert {entry["diagnosis"] for entry in provenance["ground_truth"]} <= set(params.dataset.class_names)
    assert [f["fault"] for f in provenance["faults"]] == [MALFORMED_PATIENT_FAULT]
    assert provenance["seed"] == params.drops.new_patients.seed != params.seed


def test_ingest_apply_mode_admits_unlabelled_patients(new_patients: tuple[Params, Path], tmp_path: Path) -> None:
    params, raw = new_patients
    os.environ.pop(params.ingest.deid_key_env, None)
    malformed = json.loads((raw / "cohort.json").read_text())["faults"][0]["patient_id"]
    training = run_ingest(params, raw, tmp_path / "i1", tmp_path / "q1", tmp_path / "r1")
    assert training.n_patients == 0 and training.quarantined_by_reason["missing_label"] >= 1
    applied = run_ingest(params, raw, tmp_path / "i2", tmp_path / "q2", tmp_path / "r2", label_required=False)
    assert applied.records_in == applied.accepted + applied.quarantined == training.records_in
    assert "missing_label" not in applied.quarantined_by_reason
    assert applied.quarantined_by_reason["out_of_range"] == 1
    manifest = pd.read_parquet(applied.manifest)
    no_modality = applied.quarantined_by_reason.get("no_modality", 0)
    assert len(manifest) == 10 - 1 - no_modality and manifest["label"].isna().all()
    quarantined = [json.loads(line) for line in (tmp_path / "q2" / "quarantine.jsonl").read_text().splitlines()]
    assert {e["reason"] for e in quarantined if e.get("patient_id") == malformed} == {"out_of_range", "orphan_record"}


def test_external_drop_is_labelled_and_can_shift_the_site(tiny_params: Params, tmp_path: Path) -> None:
    params = apply_overrides(tiny_params, ["drops.external.n_patients=6", "drops.external.minority_site_fraction=1.0"])
    result = generate_drop(params, params.drops.external, tmp_path / "external")
    conditions = (tmp_path / "external" / "ehr" / "Condition.ndjson").read_text().splitlines()
    assert len(conditions) == result.n_patients == 6
    assert result.site_counts == {"site_a": 0, "site_b": 6} and not result.faults
    assert all(json.loads(line)["subject"]["reference"].startswith("Patient/EXT") for line in conditions)
