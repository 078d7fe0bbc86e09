"""The compiled ``meddiff-retrain`` pipeline (the recurring run): monitor first, training only inside the
condition on its ``retrain`` output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from meddiff_pipelines.pipeline import PIPELINE_STAGES, SOURCE_STAGES
from meddiff_pipelines.retrain import RETRAIN_BRANCH, RETRAIN_PIPELINE, compile_retrain_pipeline

from meddiff.config import apply_overrides, load_params
from meddiff.errors import UserError

REPO = Path(__file__).resolve().parents[2]
DROP = "s3://hospital/exports/latest"


@pytest.fixture
def compiled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = apply_overrides(load_params(REPO / "params.yaml"), [f"ingest.raw_uri={DROP}"])
    spec, _ = yaml.safe_load_all(compile_retrain_pipeline(params, tmp_path / "retrain.yaml").read_text())
    return spec


def test_training_runs_only_when_monitor_says_retrain(compiled: dict[str, Any]) -> None:
    assert compiled["pipelineInfo"]["name"] == RETRAIN_PIPELINE
    assert compiled["root"]["inputDefinitions"]["parameters"]["raw_uri"]["defaultValue"] == DROP
    tasks = compiled["root"]["dag"]["tasks"]
    assert sorted(tasks) == ["condition-1", "monitor"]
    condition = tasks["condition-1"]
    assert condition["taskInfo"]["name"] == RETRAIN_BRANCH
    retrain = "inputs.parameter_values['pipelinechannel--monitor-retrain'] == true"
    assert condition["triggerPolicy"]["condition"] == retrain
    assert condition["dependentTasks"] == ["monitor"]
    branch = compiled["components"][condition["componentRef"]["name"]]["dag"]["tasks"]
    assert sorted(branch) == sorted(PIPELINE_STAGES[len(SOURCE_STAGES):])  # ingest … promote, no cohort
    assert branch["ingest"]["inputs"]["parameters"]["raw_uri"]["componentInputParameter"] == "pipelinechannel--raw_uri"
    monitor = compiled["root"]["dag"]["tasks"]["monitor"]
    assert monitor["inputs"]["parameters"]["new_patients_uri"]["componentInputParameter"] == "raw_uri"
    assert monitor["cachingOptions"] == {}  # the registry's champion changes under it: never cached


def test_a_recurring_run_needs_the_teams_drop(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="give --raw-uri"):
        compile_retrain_pipeline(load_params(REPO / "params.yaml"), tmp_path / "retrain.yaml")
