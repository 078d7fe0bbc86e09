"""``meddiff monitor`` on constructed drops against the reference the train stage saved with the model:
patients like the training cohort → no drift, no retrain; every patient from the other scanner → retrain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meddiff.config import DropConfig, apply_overrides
from meddiff.data.cohort_drops import generate_drop
from meddiff.prediction.monitor import DECISION_FILE, run_monitor
from tests.trained_cohort import COHORT, Trained


def _drop(trained: Trained, target: Path, seed: int, minority_site_fraction: float) -> Path:
    drop = DropConfig(seed=seed, n_patients=24, id_prefix="MON", labelled=False, image_missing_fraction=0.0,
                      note_missing_fraction=0.0, labs_missing_fraction=0.0,
                      minority_site_fraction=minority_site_fraction, malformed_patients=1)
    generate_drop(trained.params, drop, target)
    return target


@pytest.fixture(scope="module")
def monitor_params(trained: Trained):
    return apply_overrides(trained.params, [f"predict.model_uri={trained.models}"])


def test_a_drop_like_the_training_cohort_is_no_reason_to_retrain(trained: Trained, monitor_params, tmp_path) -> None:
    drop = _drop(trained, tmp_path / "same", seed=11, minority_site_fraction=COHORT["minority_site_fraction"])
    result = run_monitor(monitor_params, drop, tmp_path / "report")
    decision = json.loads((tmp_path / "report" / DECISION_FILE).read_text())
    assert not result.retrain and decision["retrain"] is False and decision["reasons"] == []
    assert set(result.drifted_share) == {"ehr", "note", "image", "latent"}
    assert all(share < monitor_params.monitor.drift_share for share in result.drifted_share.values())
    assert result.n_new_patients == 23 and result.quarantined > 0  # the malformed patient, with a reason
    assert result.n_new_labelled == 0
    assert (tmp_path / "report" / "index.html").read_text().count("<tr>") == 5  # header + 4 groups
    assert (tmp_path / "report" / "drift_image.html").is_file()


def test_a_shifted_site_is_a_reason_to_retrain(trained: Trained, monitor_params, tmp_path) -> None:
    drop = _drop(trained, tmp_path / "site_b", seed=12, minority_site_fraction=1.0)
    result = run_monitor(monitor_params, drop, tmp_path / "report")
    assert result.retrain
    assert any(reason.startswith("image drift") for reason in result.reasons)
    drift = json.loads((tmp_path / "report" / "drift.json").read_text())
    image = next(g for g in drift["groups"] if g["group"] == "image")
    # the other scanner is noisier (9 vs 4 HU): the spread inside the brain is what moved
    assert next(c for c in image["columns"] if c["column"] == "brain_window_std")["drifted"]
