"""The ``promote`` stage: the registry gate moves alias ``champion`` only to a better version."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from meddiff.config import apply_overrides
from meddiff.evaluation.promote import DECISION_FILE, champion_gate, run_promote
from meddiff.io import write_json


def write_evaluation(folder: Path, auc: float) -> Path:
    write_json(folder / "metrics.json", {"test": {"auc_macro": {"value": auc, "ci_low": auc, "ci_high": auc}}})
    return folder


def clear_champion(client, name: str) -> None:
    if "champion" in client.get_registered_model(name).aliases:
        client.delete_registered_model_alias(name, "champion")


def test_gate_promotes_and_refuses(trained_tiny) -> None:
    from mlflow.tracking import MlflowClient

    params = trained_tiny["params"]
    data = trained_tiny["data"]
    index = data.indices("test")
    client = MlflowClient(tracking_uri=params.tracking.tracking_uri)
    name = params.tracking.registered_model
    first = client.get_model_version_by_alias(name, "candidate")
    clear_champion(client, name)
    decision = champion_gate(params, str(first.version), 0.5, data, index)
    assert decision.promoted and decision.reason == "no champion yet"
    # A second version of the same model: the champion is rescored on this test split.
    second = client.create_model_version(name, first.source, run_id=first.run_id)
    refused = champion_gate(params, str(second.version), 0.0, data, index)
    assert not refused.promoted
    assert refused.champion_auc_source == "rescored on this test split"
    assert np.isfinite(refused.champion_auc)
    assert client.get_model_version_by_alias(name, "champion").version == first.version
    promoted = champion_gate(params, str(second.version), 1.01, data, index)
    assert promoted.promoted
    assert str(client.get_model_version_by_alias(name, "champion").version) == str(second.version)


def test_run_promote_reads_the_evaluation_and_writes_the_decision(trained_tiny, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    params = trained_tiny["params"]
    client = MlflowClient(tracking_uri=params.tracking.tracking_uri)
    name = params.tracking.registered_model
    clear_champion(client, name)
    evaluation = write_evaluation(tmp_path / "evaluate", 0.61)
    absent = tmp_path / "absent"  # no explanation scores, no data card: the card says "not measured"
    decision = run_promote(params, trained_tiny["processed"], trained_tiny["models"], evaluation, absent, absent,
                           tmp_path / "promote")
    written = json.loads((tmp_path / "promote" / DECISION_FILE).read_text())
    assert written == decision.to_dict()
    assert decision.promoted and decision.candidate_auc == pytest.approx(0.61)
    version = json.loads((trained_tiny["models"] / "run.json").read_text())["registered_version"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == str(version)

    disabled = apply_overrides(params, ["promote.enabled=false"])
    clear_champion(client, name)
    kept = run_promote(disabled, trained_tiny["processed"], trained_tiny["models"], evaluation, absent, absent,
                       tmp_path / "off")
    assert not kept.promoted and kept.reason == "promote.enabled is false"
    assert not any(alias == "champion" for alias in client.get_registered_model(name).aliases)


def test_run_promote_without_evaluation_names_the_file(trained_tiny, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"metrics\.json: run the evaluate stage first"):
        run_promote(trained_tiny["params"], trained_tiny["processed"], trained_tiny["models"], tmp_path, tmp_path,
                    tmp_path, tmp_path / "p")
