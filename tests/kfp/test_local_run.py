"""The pipeline run end to end with ``kfp.local`` (``SubprocessRunner``, the current interpreter).

* ``test_pipeline_wiring_with_fake_stages``: the whole pipeline over stand-in stage
  functions (``fake_stages/sitecustomize.py``): checks the KFP shell alone, params and artifacts
  flowing from task to task and the evaluate metrics, in seconds.
* ``test_cohort_component``: a one-task pipeline with the real cohort stage.
* ``test_full_pipeline``: every real stage on tiny params, then the artefacts under the pipeline root.

The real-stage tests skip, naming the module, while a stage module of :data:`meddiff.stage_table.STAGES`
does not exist yet.

No ``from __future__ import annotations``: KFP reads the annotations of the pipeline function defined
in ``test_cohort_component`` and needs real types.
"""

import importlib.util
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kfp import dsl, local
from kfp.dsl import Dataset
from meddiff_components.stages import build_components
from meddiff_pipelines.pipeline import build_pipeline, params_to_json

from meddiff.cli import main
from meddiff.config import Params, apply_overrides, load_params
from meddiff.data.drop import folder_version
from meddiff.data.phi_scan import find_identifiers, raw_identifiers
from meddiff.stage_table import PIPELINE_STAGES, STAGES

REPO = Path(__file__).resolve().parents[2]
FAKE_STAGES = Path(__file__).resolve().parent / "fake_stages"

# kfp.local warns when an image name lacks "python"; SubprocessRunner ignores the image anyway.
# kfp.local ignores Kubernetes resources and accelerators, and says so per task.
pytestmark = [
    pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Task .* have no effect in the current local runner:UserWarning"),
]

#: A CPU run of about a minute. Volumes keep their default size: at much smaller ones lesions vanish in
#: resampling and explain finds no test patient with a lesion mask to explain.
TINY_OVERRIDES = [
    "cohort.n_patients=32",
    "train.epochs=1",
    "train.batch_size=8",
    "train.model.image_channels=[4,8]",
    "train.model.d_model=16",
    "train.model.n_heads=2",
    "train.model.text_layers=1",
    "train.model.tabular_hidden=16",
    "train.diffusion.unet_channels=[8,16]",
    "train.diffusion.num_train_timesteps=50",
    "evaluate.n_repeats=1",
    "generate.n_per_class=2",
    "generate.num_inference_steps=5",
    "explain.n_patients=2",
]


def missing_stage_modules(stages: list[str]) -> list[str]:
    """The library modules of ``stages`` that cannot be imported yet."""
    missing = []
    for stage in stages:
        module = STAGES[stage].module
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(module)
    return missing


def require_stages(*stages: str) -> None:
    missing = missing_stage_modules(list(stages or PIPELINE_STAGES))
    if missing:
        pytest.skip(f"stage modules not written yet: {', '.join(missing)}")


@pytest.fixture
def tiny_params(tmp_path: Path) -> Params:
    params = load_params(REPO / "params.yaml")
    return apply_overrides(params, [*TINY_OVERRIDES, f"tracking.artifact_location={tmp_path / 'mlartifacts'}"])


@pytest.fixture
def pipeline_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A ``kfp.local`` session whose outputs, MLflow store and working folder all live in tmp."""
    root = tmp_path / "pipeline_root"
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)  # the subprocesses inherit it: relative paths stay out of the repo
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    yield root


def task_dir(root: Path, task: str) -> Path:
    """``<pipeline root>/<pipeline>-<timestamp>/<task>`` of the one run under ``root``."""
    (run,) = [path for path in root.iterdir() if path.is_dir()]
    return run / task


def executor_output(root: Path, task: str) -> dict[str, Any]:
    return json.loads((task_dir(root, task) / "executor_output.json").read_text())


def test_pipeline_wiring_with_fake_stages(tmp_path: Path, pipeline_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(FAKE_STAGES))
    params = apply_overrides(load_params(REPO / "params.yaml"), ["cohort.n_patients=24", "train.epochs=1"])

    build_pipeline(params, image="meddiff:test")()  # parameters from their defaults: raw_uri "", the cohort

    cohort_version = folder_version(task_dir(pipeline_root, "cohort") / "raw")
    assert cohort_version.startswith("sha256:")
    validation = json.loads((task_dir(pipeline_root, "ingest") / "report" / "validation.json").read_text())
    assert validation["records_in"] == 24
    assert validation["records_in"] == validation["accepted"] + validation["quarantined"]
    run = json.loads((task_dir(pipeline_root, "train") / "model" / "run.json").read_text())
    assert run == {
        "epochs": 1,
        "patients": 23,
        "tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}",
        "data_version": cohort_version,  # ingest's hash of the cohort, exported as $MEDDIFF_DATA_VERSION
    }
    assert json.loads((task_dir(pipeline_root, "generate") / "synthetic" / "patients.json").read_text()) == {
        "n": params.generate.n_per_class * len(params.dataset.class_names)
    }
    assert (task_dir(pipeline_root, "explain") / "report" / "index.html").is_file()

    evaluate = executor_output(pipeline_root, "evaluate")
    (metrics,) = evaluate["artifacts"]["metrics"]["artifacts"]
    assert metrics["metadata"] == {  # finite numeric leaves only, dotted keys; no bools, strings, NaN
        "test.auc_macro": 0.875,
        "test.f1_macro": 0.5,
        "test.n": 12.0,
        "robustness.0.masking_rate": 0.0,
        "robustness.0.auc_macro": 0.875,
        "robustness.1.masking_rate": 0.8,
        "robustness.1.auc_macro": 0.625,
    }
    assert evaluate["parameterValues"]["Output"]["auc_macro"] == 0.875
    decision = json.loads((task_dir(pipeline_root, "promote") / "report" / "decision.json").read_text())
    assert decision == {"promoted": True, "candidate_auc": 0.875}  # read from evaluate's report artifact
    assert (task_dir(pipeline_root, "ingest") / "data_version").read_text() == cohort_version  # output parameter
    assert executor_output(pipeline_root, "cohort")["parameterValues"]["Output"]["data_version"] == ""
    for task in PIPELINE_STAGES[1:]:
        assert executor_output(pipeline_root, task)["parameterValues"]["Output"]["data_version"] == cohort_version, task
    # the version travels with the data too (CLI and DVC runs are separate processes)
    for folder in ("ingest/interim", "preprocess/processed", "train/model"):
        recorded = json.loads((task_dir(pipeline_root, "") / folder / "data_version.json").read_text())
        assert recorded == {"data_version": cohort_version}, folder
    assert not list(Path.cwd().iterdir()), "a stage wrote into the working folder"


def test_cli_run_subprocess(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``meddiff pipeline run --runner subprocess``: the whole pipeline through the CLI (stand-in stages)."""
    monkeypatch.setenv("PYTHONPATH", str(FAKE_STAGES))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    monkeypatch.setenv("MEDDIFF_GIT_COMMIT", "fedcba9876543210fedcba9876543210fedcba98")
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    root = tmp_path / "outputs"
    argv = [
        "pipeline", "run", "--runner", "subprocess", "--params", str(REPO / "params.yaml"),
        "--set", "cohort.n_patients=12", "--set", "train.epochs=2", "--pipeline-root", str(root),
    ]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)  # stdout holds the result only; kfp.local logs go to stderr
    assert result["runner"] == "subprocess" and Path(result["run_dir"]).parent == root
    run = json.loads((task_dir(root, "train") / "model" / "run.json").read_text())
    assert run["epochs"] == 2 and run["patients"] == 11
    assert run["data_version"] == folder_version(task_dir(root, "cohort") / "raw")  # the cohort's content hash
    assert result["data_version"] == run["data_version"] and result["raw_uri"] == ""
    assert (task_dir(root, "explain") / "report" / "index.html").is_file()
    assert not list(workdir.iterdir()), "a stage wrote into the working folder"


def test_cli_run_docker_stops_at_once_without_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No Docker engine here: ``--runner docker`` must say so at once and run nothing."""
    root = tmp_path / "outputs"
    params_file = str(REPO / "params.yaml")
    argv = ["pipeline", "run", "--runner", "docker", "--params", params_file, "--pipeline-root", str(root)]

    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'no-docker.sock'}")
    started = time.monotonic()
    assert main(argv) == 1
    assert time.monotonic() - started < 5
    assert f"no Docker engine answers at unix://{tmp_path / 'no-docker.sock'}" in capsys.readouterr().err
    assert not root.exists()

    # an endpoint that accepts connections but never answers: the short timeout applies
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv("DOCKER_HOST", f"tcp://127.0.0.1:{silent.getsockname()[1]}")
        started = time.monotonic()
        assert main([*argv, "--docker-timeout", "1"]) == 1
        assert time.monotonic() - started < 10
    assert "no Docker engine answers at tcp://127.0.0.1:" in capsys.readouterr().err
    assert not root.exists()


def test_cohort_component(tiny_params: Params, pipeline_root: Path) -> None:
    require_stages("cohort")
    cohort = build_components(image="meddiff:test")["cohort"]

    @dsl.pipeline(name="meddiff-cohort")
    def cohort_only(params_json: str) -> Dataset:
        return cohort(params_json=params_json).outputs["raw"]

    raw = Path(cohort_only(params_json=params_to_json(tiny_params)).output.path)
    assert raw.is_dir()
    assert any(path.is_file() for path in raw.rglob("*")), f"{raw}: the cohort wrote no files"


@pytest.mark.slow
def test_full_pipeline(tiny_params: Params, pipeline_root: Path) -> None:
    require_stages()

    build_pipeline(tiny_params, image="meddiff:test")()

    validation = json.loads((task_dir(pipeline_root, "ingest") / "report" / "validation.json").read_text())
    # records (FHIR resources, series, notes, files), not patients: at least one per patient
    assert validation["records_in"] >= tiny_params.cohort.n_patients
    assert validation["records_in"] == validation["accepted"] + validation["quarantined"]
    assert validation["accepted"] > 0

    model_dir = task_dir(pipeline_root, "train") / "model"
    assert (model_dir / "run.json").is_file()
    checkpoints = [p for p in model_dir.rglob("*") if p.suffix in {".pt", ".pth", ".ckpt", ".safetensors"}]
    assert checkpoints, f"{model_dir}: no model checkpoint"

    metrics_file = task_dir(pipeline_root, "evaluate") / "report" / "metrics.json"
    assert metrics_file.is_file()
    (logged,) = executor_output(pipeline_root, "evaluate")["artifacts"]["metrics"]["artifacts"]
    assert logged["metadata"], "evaluate logged no metrics"

    assert any((task_dir(pipeline_root, "generate") / "synthetic").rglob("*"))
    assert (task_dir(pipeline_root, "explain") / "report" / "index.html").is_file()

    # Nothing identifying in any KFP artefact past ingest, nor in the MLflow store the tasks wrote.
    # The cohort's raw artefact and ingest's quarantine hold raw records by design.
    identifiers = raw_identifiers(task_dir(pipeline_root, "cohort") / "raw")
    assert len(identifiers) > 20
    run = task_dir(pipeline_root, "cohort").parent
    mlflow_store = Path(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"))
    leaks = find_identifiers(
        [run, mlflow_store, tiny_params.tracking.artifact_location], identifiers,
        skip=[task_dir(pipeline_root, "cohort"), task_dir(pipeline_root, "ingest") / "quarantine"],
    )
    assert not leaks, [f"{leak.path}: {leak.identifiers[:3]}" for leak in leaks]
