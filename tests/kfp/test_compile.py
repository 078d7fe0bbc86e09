"""The compiled KFP v2 pipeline, checked on its IR (the YAML the compiler writes), not on substrings.

The compiled file holds two YAML documents: the ``PipelineSpec`` and the ``PlatformSpec``
(Kubernetes settings from ``kfp.kubernetes``: tolerations, Secrets).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from meddiff_components.stages import GPU_IMAGE_ENV, IMAGE_ENV, STAGE_FUNCTIONS
from meddiff_pipelines.pipeline import CREDENTIALS_SECRET, compile_pipeline

import meddiff
from meddiff.cli import main
from meddiff.config import Params, apply_overrides, load_params
from meddiff.stage_table import PIPELINE_STAGES, STAGES, ArtifactKind
from meddiff.tracking import git_commit

REPO = Path(__file__).resolve().parents[2]
PARAMS_FILE = REPO / "params.yaml"
DOWNSTREAM_OF_TRAIN = ("evaluate", "generate", "explain")
#: Component outputs that are no stage port: (stage, artifact) → KFP artifact type.
EXTRA_OUTPUTS = {("evaluate", "metrics"): "system.Metrics", ("explain", "html"): "system.HTML"}
#: Tasks that never cache: the registry gate reads the registry, not only its inputs.
NEVER_CACHED = {"promote"}


def load_ir(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pipeline spec, platform spec) of a compiled pipeline file."""
    documents = list(yaml.safe_load_all(path.read_text()))
    assert len(documents) == 2, "expected the PipelineSpec and the PlatformSpec documents"
    return documents[0], documents[1]


def executor_of(spec: dict[str, Any], task: str) -> str:
    """The executor label (``exec-train``) of a root DAG task."""
    component = spec["root"]["dag"]["tasks"][task]["componentRef"]["name"]
    return spec["components"][component]["executorLabel"]


@pytest.fixture(autouse=True)
def _no_image_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (IMAGE_ENV, GPU_IMAGE_ENV, "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def params() -> Params:
    return load_params(PARAMS_FILE)


@pytest.fixture
def compiled(params: Params, tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    output = compile_pipeline(params, tmp_path / "pipeline.yaml", image=None)
    return load_ir(output)


def test_one_component_per_pipeline_stage() -> None:
    assert tuple(STAGE_FUNCTIONS) == PIPELINE_STAGES
    assert "suite" in STAGES and "suite" not in PIPELINE_STAGES


def test_one_task_per_pipeline_stage(compiled: tuple[dict[str, Any], dict[str, Any]]) -> None:
    spec, _ = compiled
    assert spec["pipelineInfo"]["name"] == "meddiff"
    assert set(spec["root"]["dag"]["tasks"]) == set(PIPELINE_STAGES)


def test_dependencies(compiled: tuple[dict[str, Any], dict[str, Any]]) -> None:
    tasks = compiled[0]["root"]["dag"]["tasks"]
    depends = {name: set(task.get("dependentTasks", [])) for name, task in tasks.items()}
    assert depends["cohort"] == set()
    assert depends["ingest"] == {"cohort"}
    assert depends["preprocess"] == {"ingest"}
    assert depends["train"] == {"preprocess"}
    for name in DOWNSTREAM_OF_TRAIN:
        # after train, and in parallel with each other
        assert "train" in depends[name]
        assert not depends[name] & set(DOWNSTREAM_OF_TRAIN)
    assert depends["promote"] == {"preprocess", "train", "evaluate"}  # the gate reads the evaluation


def test_artifacts_wire_stage_outputs_to_inputs(compiled: tuple[dict[str, Any], dict[str, Any]]) -> None:
    tasks = compiled[0]["root"]["dag"]["tasks"]

    def source(task: str, artifact: str) -> tuple[str, str]:
        ref = tasks[task]["inputs"]["artifacts"][artifact]["taskOutputArtifact"]
        return ref["producerTask"], ref["outputArtifactKey"]

    assert source("ingest", "raw") == ("cohort", "raw")
    assert source("preprocess", "interim") == ("ingest", "interim")
    assert source("train", "processed") == ("preprocess", "processed")
    for name in DOWNSTREAM_OF_TRAIN:
        assert source(name, "processed") == ("preprocess", "processed")
        assert source(name, "model") == ("train", "model")
    assert source("promote", "evaluation") == ("evaluate", "report")


def test_component_artifacts_match_the_stage_table(compiled: tuple[dict[str, Any], dict[str, Any]]) -> None:
    """Every port of a stage is a component artifact of the port's name and kind, inputs as inputs and
    outputs as outputs, and nothing else (but the evaluate task's KFP metrics and the explain task's HTML page)."""
    spec, _ = compiled
    for stage in PIPELINE_STAGES:
        component = spec["components"][f"comp-{stage}"]
        inputs = component.get("inputDefinitions", {}).get("artifacts", {})
        outputs = {
            name: artifact for name, artifact in component.get("outputDefinitions", {}).get("artifacts", {}).items()
            if (stage, name) not in EXTRA_OUTPUTS
        }
        assert set(inputs) == {port.artifact for port in STAGES[stage].inputs}, stage
        assert set(outputs) == {port.artifact for port in STAGES[stage].outputs}, stage
        for port in STAGES[stage].ports:
            artifact = (inputs | outputs)[port.artifact]
            assert artifact["artifactType"]["schemaTitle"] == f"system.{ArtifactKind(port.kind).value}", (stage, port)
        assert set(component["inputDefinitions"]["parameters"]) == {"params_json", "data_version"}


def test_evaluate_logs_metrics_and_returns_result(compiled: tuple[dict[str, Any], dict[str, Any]]) -> None:
    outputs = compiled[0]["components"]["comp-evaluate"]["outputDefinitions"]
    assert outputs["artifacts"]["metrics"]["artifactType"]["schemaTitle"] == "system.Metrics"
    assert outputs["parameters"]["Output"]["parameterType"] == "STRUCT"


def test_explain_shows_its_report_as_html(compiled: tuple[dict[str, Any], dict[str, Any]]) -> None:
    spec, _ = compiled
    for (stage, name), schema in EXTRA_OUTPUTS.items():
        artifacts = spec["components"][f"comp-{stage}"]["outputDefinitions"]["artifacts"]
        assert artifacts[name]["artifactType"]["schemaTitle"] == schema, (stage, name)


def test_train_requests_one_gpu(compiled: tuple[dict[str, Any], dict[str, Any]]) -> None:
    spec, _ = compiled
    executors = spec["deploymentSpec"]["executors"]
    resources = executors[executor_of(spec, "train")]["container"]["resources"]
    assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert int(resources["accelerator"]["resourceCount"]) == 1
    assert "resourceCpuRequest" in resources and "resourceMemoryRequest" in resources
    for stage in set(PIPELINE_STAGES) - {"train"}:
        assert "accelerator" not in executors[executor_of(spec, stage)]["container"].get("resources", {})


def test_train_tolerates_gpu_taint(compiled: tuple[dict[str, Any], dict[str, Any]]) -> None:
    spec, platform = compiled
    kubernetes = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in kubernetes[
        executor_of(spec, "train")
    ]["tolerations"]
    for stage in set(PIPELINE_STAGES) - {"train"}:
        assert "tolerations" not in kubernetes[executor_of(spec, stage)]


def kubernetes_executors(spec: dict[str, Any], platform: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The Kubernetes platform config of every root task, keyed by task name."""
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    return {task: executors.get(executor_of(spec, task), {}) for task in spec["root"]["dag"]["tasks"]}


def test_train_node_selector_from_params(compiled: tuple[dict[str, Any], dict[str, Any]], params: Params) -> None:
    config = kubernetes_executors(*compiled)
    assert config["train"]["nodeSelector"] == {"labels": params.pipeline.gpu_node_selector}
    assert params.pipeline.gpu_node_selector  # the shipped params.yaml names the GPU pool
    for stage in set(PIPELINE_STAGES) - {"train"}:
        assert "nodeSelector" not in config[stage]


def test_node_selector_override(params: Params, tmp_path: Path) -> None:
    selector = "pipeline.gpu_node_selector={cloud.google.com/gke-accelerator: nvidia-h100-80gb, pool: gpu}"
    spec, platform = load_ir(compile_pipeline(apply_overrides(params, [selector]), tmp_path / "p.yaml"))
    labels = kubernetes_executors(spec, platform)["train"]["nodeSelector"]["labels"]
    assert labels == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb", "pool": "gpu"}


def test_timeouts_per_task(compiled: tuple[dict[str, Any], dict[str, Any]], params: Params) -> None:
    config = kubernetes_executors(*compiled)
    for stage in PIPELINE_STAGES:
        assert int(config[stage]["activeDeadlineSeconds"]) == params.pipeline.timeouts[stage], stage


def test_timeout_override_and_unknown_stage(params: Params, tmp_path: Path) -> None:
    spec, platform = load_ir(
        compile_pipeline(apply_overrides(params, ["pipeline.timeouts={train: 600}"]), tmp_path / "p.yaml")
    )
    config = kubernetes_executors(spec, platform)
    assert int(config["train"]["activeDeadlineSeconds"]) == 600
    assert "activeDeadlineSeconds" not in config["cohort"]  # a stage left out has no deadline
    with pytest.raises(ValueError, match=r"pipeline\.timeouts.*trian"):
        apply_overrides(params, ["pipeline.timeouts={trian: 600}"])


def caching(spec: dict[str, Any]) -> dict[str, bool]:
    # enableCache false is the proto default, so the compiler leaves it out
    tasks = spec["root"]["dag"]["tasks"]
    return {name: task["cachingOptions"].get("enableCache", False) for name, task in tasks.items()}


def test_caching_on_for_deterministic_stages_off_for_training(compiled: tuple[dict[str, Any], dict[str, Any]]) -> None:
    assert caching(compiled[0]) == {stage: stage not in {"train", *NEVER_CACHED} for stage in PIPELINE_STAGES}


def test_caching_training_when_asked(params: Params, tmp_path: Path) -> None:
    spec, _ = load_ir(compile_pipeline(apply_overrides(params, ["pipeline.cache_training=true"]), tmp_path / "p.yaml"))
    assert caching(spec) == {stage: stage not in NEVER_CACHED for stage in PIPELINE_STAGES}


def test_credentials_secret_name_from_params(params: Params, tmp_path: Path) -> None:
    spec, platform = load_ir(
        compile_pipeline(apply_overrides(params, ["pipeline.credentials_secret=team-a-creds"]), tmp_path / "p.yaml")
    )
    for stage, config in kubernetes_executors(spec, platform).items():
        (secret,) = config["secretAsEnv"]
        assert secret["secretName"] == "team-a-creds", stage
        assert {m["envVar"] for m in secret["keyToEnv"]} >= {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}


def test_data_version_parameter_defaults_to_the_commit(compiled: tuple[dict[str, Any], dict[str, Any]]) -> None:
    spec, _ = compiled
    parameter = spec["root"]["inputDefinitions"]["parameters"]["data_version"]
    assert parameter["parameterType"] == "STRING"
    assert parameter["defaultValue"] == git_commit()
    for name, task in spec["root"]["dag"]["tasks"].items():
        assert task["inputs"]["parameters"]["data_version"] == {"componentInputParameter": "data_version"}, name
        assert task["inputs"]["parameters"]["params_json"] == {"componentInputParameter": "params_json"}, name


def test_data_version_given(params: Params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec, _ = load_ir(compile_pipeline(params, tmp_path / "p.yaml", data_version="v2024.06"))
    assert spec["root"]["inputDefinitions"]["parameters"]["data_version"]["defaultValue"] == "v2024.06"
    monkeypatch.setenv("MEDDIFF_GIT_COMMIT", "0123456789abcdef0123456789abcdef01234567")
    spec, _ = load_ir(compile_pipeline(params, tmp_path / "q.yaml"))
    default = spec["root"]["inputDefinitions"]["parameters"]["data_version"]["defaultValue"]
    assert default == "0123456789abcdef0123456789abcdef01234567"


def test_credentials_from_optional_secret(compiled: tuple[dict[str, Any], dict[str, Any]]) -> None:
    spec, platform = compiled
    kubernetes = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for stage in PIPELINE_STAGES:
        (secret,) = kubernetes[executor_of(spec, stage)]["secretAsEnv"]
        assert secret["secretName"] == CREDENTIALS_SECRET
        assert secret["optional"] is True
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= {m["envVar"] for m in secret["keyToEnv"]}


def test_retries_with_backoff_on_io_stages(compiled: tuple[dict[str, Any], dict[str, Any]]) -> None:
    tasks = compiled[0]["root"]["dag"]["tasks"]
    for name in ("cohort", "ingest"):
        policy = tasks[name]["retryPolicy"]
        assert policy["maxRetryCount"] >= 1
        assert policy["backoffFactor"] > 1
        assert policy["backoffDuration"].endswith("s")
    for name in ("train", *DOWNSTREAM_OF_TRAIN):
        assert "retryPolicy" not in tasks[name]


def test_params_json_default_is_the_params_file(compiled: tuple[dict[str, Any], dict[str, Any]]) -> None:
    parameter = compiled[0]["root"]["inputDefinitions"]["parameters"]["params_json"]
    assert parameter["parameterType"] == "STRING"
    assert json.loads(parameter["defaultValue"]) == load_params(PARAMS_FILE).to_dict()


def test_params_json_default_carries_overrides(params: Params, tmp_path: Path) -> None:
    spec, _ = load_ir(compile_pipeline(apply_overrides(params, ["train.epochs=3"]), tmp_path / "p.yaml"))
    default = spec["root"]["inputDefinitions"]["parameters"]["params_json"]["defaultValue"]
    assert json.loads(default)["train"]["epochs"] == 3


def test_no_pip_install_at_run_time(compiled: tuple[dict[str, Any], dict[str, Any]]) -> None:
    spec, _ = compiled
    for label, executor in spec["deploymentSpec"]["executors"].items():
        container = executor["container"]
        for part in [*container["command"], *container.get("args", [])]:
            assert "pip install" not in part, f"{label} installs packages at run time"


def test_default_images(compiled: tuple[dict[str, Any], dict[str, Any]]) -> None:
    spec, _ = compiled
    executors = spec["deploymentSpec"]["executors"]
    version = meddiff.__version__
    for stage in PIPELINE_STAGES:
        expected = f"ghcr.io/meddiff/meddiff:{version}" + ("-cuda" if stage == "train" else "")
        assert executors[executor_of(spec, stage)]["container"]["image"] == expected


def test_image_from_environment(params: Params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(IMAGE_ENV, "registry.local/meddiff:dev")
    monkeypatch.setenv(GPU_IMAGE_ENV, "registry.local/meddiff:dev-cuda")
    spec, _ = load_ir(compile_pipeline(params, tmp_path / "p.yaml"))
    images = {
        stage: spec["deploymentSpec"]["executors"][executor_of(spec, stage)]["container"]["image"]
        for stage in PIPELINE_STAGES
    }
    assert images.pop("train") == "registry.local/meddiff:dev-cuda"
    assert set(images.values()) == {"registry.local/meddiff:dev"}


def test_explicit_image_is_used_everywhere(params: Params, tmp_path: Path) -> None:
    spec, _ = load_ir(compile_pipeline(params, tmp_path / "p.yaml", image="registry.local/meddiff:x"))
    images = {executor["container"]["image"] for executor in spec["deploymentSpec"]["executors"].values()}
    assert images == {"registry.local/meddiff:x"}


def test_mlflow_tracking_uri_passes_through(params: Params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.meddiff.svc:5000")
    spec, _ = load_ir(compile_pipeline(params, tmp_path / "p.yaml"))
    env = spec["deploymentSpec"]["executors"][executor_of(spec, "train")]["container"]["env"]
    assert {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow.meddiff.svc:5000"} in env


def test_mlflow_tracking_uri_from_the_config_map(compiled: tuple[dict[str, Any], dict[str, Any]]) -> None:
    for stage, config in kubernetes_executors(*compiled).items():
        (config_map,) = config["configMapAsEnv"]
        assert config_map["configMapName"] == "meddiff-config", stage
        assert config_map["optional"] is True
        assert config_map["keyToEnv"] == [{"configMapKey": "MLFLOW_TRACKING_URI", "envVar": "MLFLOW_TRACKING_URI"}]


def test_config_map_yields_to_the_compile_environment_or_can_be_off(
    params: Params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, platform = load_ir(compile_pipeline(apply_overrides(params, ['pipeline.config_map=""']), tmp_path / "a.yaml"))
    assert all("configMapAsEnv" not in config for config in kubernetes_executors(spec, platform).values())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    spec, platform = load_ir(compile_pipeline(params, tmp_path / "b.yaml"))
    assert all("configMapAsEnv" not in config for config in kubernetes_executors(spec, platform).values())


def test_compile_writes_into_new_folder_and_rejects_other_formats(params: Params, tmp_path: Path) -> None:
    output = compile_pipeline(params, tmp_path / "nested" / "pipeline.yaml")
    assert output.is_file()
    assert [p.name for p in output.parent.iterdir()] == ["pipeline.yaml"]  # no temporary left behind
    with pytest.raises(ValueError, match=r"\.yaml"):
        compile_pipeline(params, tmp_path / "pipeline.json")


def test_cli_compile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "pipeline.yaml"
    argv = [
        "pipeline", "compile", "--params", str(PARAMS_FILE), "--set", "train.epochs=2",
        "--set", "pipeline.cache_training=true", "--data-version", "data-v7", "--output", str(output),
    ]
    assert main(argv) == 0
    assert f"wrote {output}" in capsys.readouterr().out
    spec, _ = load_ir(output)
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert json.loads(parameters["params_json"]["defaultValue"])["train"]["epochs"] == 2
    assert parameters["data_version"]["defaultValue"] == "data-v7"
    assert caching(spec)["train"] is True
