"""The retraining decision against the reference saved with a trained model: no drift → no retrain,
a shifted site → retrain (with its reasons), enough newly labelled patients → retrain."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from meddiff.config import MonitorConfig
from meddiff.data.dataset import UNKNOWN_LABEL, ProcessedDataset
from meddiff.model.multimodal import MedDiffModel
from meddiff.monitoring.decision import assess_drift, decide
from meddiff.monitoring.features import LatentProjection
from meddiff.monitoring.reference import MONITORING_DIR, feature_tables, load_reference
from tests.conftest import make_tiny_processed


@pytest.fixture(scope="module")
def monitored(
    trained_tiny: dict, tmp_path_factory: pytest.TempPathFactory,
) -> tuple[dict[str, pd.DataFrame], LatentProjection, ProcessedDataset, MedDiffModel]:
    """The reference the train stage saved, a new drop from the same generator (other patients) and the model."""
    saved = load_reference(trained_tiny["models"] / MONITORING_DIR)
    drop = make_tiny_processed(tmp_path_factory.mktemp("drop"), n=72, seed=1)
    drop.arrays["label"] = np.full(len(drop), UNKNOWN_LABEL)
    return saved.tables, saved.projection, drop, MedDiffModel.from_pretrained(trained_tiny["models"])


def _shifted_site(drop: ProcessedDataset) -> ProcessedDataset:
    """Another scanner and lab: brighter, noisier images and labs offset by 1.5 training sd."""
    arrays = {k: v.copy() for k, v in drop.arrays.items()}
    rng = np.random.default_rng(0)
    image = arrays["image"].astype(np.float32) * 1.3 + rng.normal(0, 0.08, arrays["image"].shape)
    arrays["image"] = np.clip(image, 0, 1).astype(np.float16)
    arrays["tabular"] = arrays["tabular"] + 1.5
    return ProcessedDataset(arrays, drop.meta, drop.vocabulary)


def test_the_train_stage_saved_the_held_out_patients_as_reference(monitored, trained_tiny: dict) -> None:
    reference, projection, _, _ = monitored
    data = trained_tiny["data"]
    held_out = data.arrays["split"] != "train"  # never the patients the fit saw (vocabulary, encoders)
    assert set(reference) == {"ehr", "note", "image", "latent"}
    assert len(reference["latent"]) == int(held_out.sum())
    assert len(reference["ehr"]) == int((held_out & data.arrays["modality_present"][:, 2]).sum())
    assert set(projection.components) == {"image", "text", "tabular"}
    saved = load_reference(trained_tiny["models"] / MONITORING_DIR)
    assert saved.patient_ids == set(data.arrays["patient_id"].tolist())  # every patient of the dataset


def test_no_drift_no_retrain(monitored, tmp_path) -> None:
    reference, projection, drop, model = monitored
    groups = assess_drift(reference, feature_tables(drop, model, projection), MonitorConfig(), html_dir=tmp_path)
    assert [g.group for g in groups] == ["ehr", "note", "image", "latent"]
    assert all(g.columns for g in groups)  # every group was tested
    decision = decide(groups, len(drop), 0, MonitorConfig())
    assert not decision.retrain and decision.reasons == []
    assert (tmp_path / "drift_ehr.html").is_file()


def test_shifted_site_retrains_and_says_why(monitored) -> None:
    reference, projection, drop, model = monitored
    groups = assess_drift(reference, feature_tables(_shifted_site(drop), model, projection), MonitorConfig())
    by_group = {g.group: g for g in groups}
    assert by_group["ehr"].drifted and by_group["image"].drifted
    assert not by_group["note"].drifted  # the notes were not touched
    decision = decide(groups, len(drop), 0, MonitorConfig())
    assert decision.retrain
    assert {reason.split(":")[0] for reason in decision.reasons} >= {"ehr drift", "image drift"}


def test_drift_outside_decide_on_is_reported_but_does_not_retrain(monitored) -> None:
    reference, _, drop, _ = monitored
    config = MonitorConfig(decide_on=["note"])
    groups = assess_drift(reference, feature_tables(_shifted_site(drop)), config)
    assert "latent" not in {g.group for g in groups}  # no model: no latent group
    assert any(g.drifted for g in groups) and not decide(groups, len(drop), 0, config).retrain


def test_enough_new_labels_retrain_without_drift() -> None:
    config = MonitorConfig(min_new_labelled=40)
    decision = decide([], n_new_patients=50, n_new_labelled=40, config=config)
    assert decision.retrain and decision.reasons == ["40 newly labelled patients (threshold 40)"]
    assert not decide([], 50, 39, config).retrain
