"""The compiled ``meddiff-predict`` pipeline (batch prediction for new patients), checked on its IR."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import yaml
from meddiff_components.predict import PREDICT_FUNCTIONS
from meddiff_pipelines.predict import BUILT_IN_BRANCH, DROP_BRANCH, compile_predict_pipeline

from meddiff.cli import main
from meddiff.config import apply_overrides, load_params
from meddiff.stage_table import PREDICT_PIPELINE, PREDICT_STAGES, STAGES

REPO = Path(__file__).resolve().parents[2]


def _tasks(spec: dict[str, Any], dag: dict[str, Any], found: dict[str, list[str]], path: str = "") -> None:
    """Executor label of every task, by the condition branches (display names) it sits in."""
    for task in dag["tasks"].values():
        component = spec["components"][task["componentRef"]["name"]]
        where = f"{path}/{task['taskInfo']['name']}" if "dag" in component else path
        if "dag" in component:
            _tasks(spec, component["dag"], found, where)
        else:
            found.setdefault(path, []).append(component["executorLabel"])


@pytest.fixture
def compiled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], dict[str, Any]]:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    output = compile_predict_pipeline(load_params(REPO / "params.yaml"), tmp_path / "predict.yaml")
    spec, platform = yaml.safe_load_all(output.read_text())
    return spec, platform


def test_components_follow_the_stage_table() -> None:
    assert tuple(PREDICT_FUNCTIONS) == PREDICT_STAGES == ("new_patients", "predict", "monitor")
    for name, function in PREDICT_FUNCTIONS.items():
        parameters = set(inspect.signature(function).parameters)
        assert {port.artifact for port in STAGES[name].ports} <= parameters, name
    assert STAGES["predict"].uri_argument in inspect.signature(PREDICT_FUNCTIONS["predict"]).parameters


def test_graph_forks_on_the_new_patients_uri(compiled: tuple[dict[str, Any], dict[str, Any]]) -> None:
    spec, _ = compiled
    assert spec["pipelineInfo"]["name"] == PREDICT_PIPELINE
    assert set(spec["root"]["inputDefinitions"]["parameters"]) == {"params_json", "new_patients_uri"}
    found: dict[str, list[str]] = {}
    _tasks(spec, spec["root"]["dag"], found)
    branches = {path.rsplit("/", 1)[-1]: sorted(labels) for path, labels in found.items()}
    assert branches == {BUILT_IN_BRANCH: ["exec-monitor", "exec-new-patients", "exec-predict"],
                        DROP_BRANCH: ["exec-monitor-2", "exec-predict-2"]}


def test_predict_task_is_never_cached_and_logs_metrics(compiled: tuple[dict[str, Any], dict[str, Any]]) -> None:
    spec, _ = compiled
    predict = [c for name, c in spec["components"].items() if name.startswith("comp-predict")]
    assert predict and all("metrics" in c["outputDefinitions"]["artifacts"] for c in predict)
    assert all(c["inputDefinitions"]["artifacts"]["new_patients"].get("isOptional") for c in predict)
    cached = []

    def walk(dag: dict[str, Any]) -> None:
        for name, task in dag["tasks"].items():
            component = spec["components"][task["componentRef"]["name"]]
            if "dag" in component:
                walk(component["dag"])
            else:
                cached.append((name, task.get("cachingOptions", {}).get("enableCache", False)))

    walk(spec["root"]["dag"])
    predict_caching = {name: cache for name, cache in cached if name.startswith("predict")}
    assert predict_caching == {"predict": False, "predict-2": False}


def test_cli_compiles_the_predict_pipeline(tmp_path: Path) -> None:
    output = tmp_path / "predict.yaml"
    arguments = ["pipeline", "compile", "--predict", "--output", str(output), "--params", str(REPO / "params.yaml")]
    assert main(arguments) == 0
    assert next(yaml.safe_load_all(output.read_text()))["pipelineInfo"]["name"] == PREDICT_PIPELINE


def test_default_uri_comes_from_the_params(tmp_path: Path) -> None:
    params = apply_overrides(load_params(REPO / "params.yaml"), ["predict.new_patients_uri=s3://hospital/new"])
    spec, _ = yaml.safe_load_all(compile_predict_pipeline(params, tmp_path / "p.yaml").read_text())
    default = spec["root"]["inputDefinitions"]["parameters"]["new_patients_uri"]["defaultValue"]
    assert default == "s3://hospital/new"
