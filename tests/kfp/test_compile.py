"""The compiled KFP v2 pipeline, checked on its IR (the YAML the compiler writes), not on substrings.

The compiled file holds two YAML documents: the ``PipelineSpec`` and the ``PlatformSpec``
(Kubernetes settings from ``kfp.kubernetes``: tolerations, Secrets).

The root DAG is one fork on ``raw_uri``: the branch ``raw_uri == ""`` runs every stage (cohort first),
the other every stage but cohort. ``test_both_branches_are_the_same_tasks`` checks that the second
branch's tasks are configured exactly as the first's; the other tests read the first branch
(:func:`tasks_of`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from meddiff_components.stages import GPU_IMAGE_ENV, IMAGE_ENV, STAGE_FUNCTIONS
from meddiff_pipelines.pipeline import CREDENTIALS_SECRET, EXTERNAL_BRANCH, compile_pipeline

import meddiff
from meddiff.cli import main
from meddiff.config import Params, apply_overrides, load_params
from meddiff.stage_table import PIPELINE_STAGES, STAGES, ArtifactKind

REPO = Path(__file__).resolve().parents[2]
PARAMS_FILE = REPO / "params.yaml"
DOWNSTREAM_OF_TRAIN = ("evaluate", "generate", "explain")
#: Component outputs that are no stage port: (stage, artifact) → KFP artifact type.
EXTRA_OUTPUTS = {("evaluate", "metrics"): "system.Metrics", ("explain", "html"): "system.HTML"}
#: Tasks that never cache: the registry gate reads the registry, not only its inputs.
NEVER_CACHED = {"promote"}
#: Every task of a branch: the pipeline stages and external validation (run only with an ``external_uri``).
KFP_TASKS = (*PIPELINE_STAGES, "external")


def load_ir(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pipeline spec, platform spec) of a compiled pipeline file."""
    documents = list(yaml.safe_load_all(path.read_text()))
    assert len(documents) == 2, "expected the PipelineSpec and the PlatformSpec documents"
    return documents[0], documents[1]


def branches(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The fork's two branches, ``"cohort"`` (``raw_uri == ""``) and ``"drop"``, as their group tasks."""
    (fork,) = spec["root"]["dag"]["tasks"].values()
    groups = spec["components"][fork["componentRef"]["name"]]["dag"]["tasks"].values()
    return {
        "drop" if group["triggerPolicy"]["condition"].startswith("!") else "cohort": group for group in groups
    }


def tasks_of(spec: dict[str, Any], branch: str = "cohort") -> dict[str, dict[str, Any]]:
    """The tasks of one branch of the fork on ``raw_uri``, keyed by stage (their display name); the tasks of
    conditions inside the branch (``external`` under ``external_uri != ""``) included."""
    group = branches(spec)[branch]

    def flat(tasks: dict[str, Any]) -> dict[str, dict[str, Any]]:
        found = {}
        for task in tasks.values():
            component = spec["components"][task["componentRef"]["name"]]
            found |= flat(component["dag"]["tasks"]) if "dag" in component else {task["taskInfo"]["name"]: task}
        return found

    return flat(spec["components"][group["componentRef"]["name"]]["dag"]["tasks"])


def executor_of(spec: dict[str, Any], task: str, branch: str = "cohort") -> str:
    """The executor label (``exec-train``) of a stage's task in one branch."""
    component = tasks_of(spec, branch)[task]["componentRef"]["name"]
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
    assert set(tasks_of(spec, "cohort")) == {*PIPELINE_STAGES, "external"}
    assert set(tasks_of(spec, "drop")) == {*PIPELINE_STAGES, "external"} - {"cohort"}


def test_external_validation_runs_only_with_an_external_uri(compiled: tuple[dict[str, Any], dict[str, Any]]) -> None:
    """In both branches: a condition ``external_uri != ""`` holding one ``external`` task that scores the model
    the branch's train task wrote, reading the drop named by the pipeline parameter."""
    spec, _ = compiled
    assert spec["root"]["inputDefinitions"]["parameters"]["external_uri"]["defaultValue"] == ""
    for branch in ("cohort", "drop"):
        group_tasks = spec["components"][branches(spec)[branch]["componentRef"]["name"]]["dag"]["tasks"]
        (condition,) = [t for t in group_tasks.values() if t["taskInfo"]["name"] == EXTERNAL_BRANCH]
        assert condition["triggerPolicy"]["condition"] == (
            "inputs.parameter_values['pipelinechannel--external_uri'] != ''")
        train = next(key for key, t in group_tasks.items() if t["taskInfo"]["name"] == "train")
        external = tasks_of(spec, branch)["external"]
        assert external["inputs"]["artifacts"]["model"]["componentInputArtifact"] == (
            f"pipelinechannel--{train}-model")
        assert external["inputs"]["parameters"]["external_uri"] == {
            "componentInputParameter": "pipelinechannel--external_uri"}
        assert "train" in condition["dependentTasks"] or train in condition["dependentTasks"]


def test_cohort_runs_only_without_raw_uri(compiled: tuple[dict[str, Any], dict[str, Any]]) -> None:
    spec, _ = compiled
    parameter = spec["root"]["inputDefinitions"]["parameters"]["raw_uri"]
    assert parameter == {"defaultValue": "", "isOptional": True, "parameterType": "STRING"}
    conditions = {name: group["triggerPolicy"]["condition"] for name, group in branches(spec).items()}
    assert conditions == {
        "cohort": "inputs.parameter_values['pipelinechannel--raw_uri'] == ''",
        "drop": "!(inputs.parameter_values['pipelinechannel--raw_uri'] == '')",
    }
    assert {branch: group["taskInfo"]["name"] for branch, group in branches(spec).items()} == {
        "cohort": "built-in cohort (no raw_uri)", "drop": "raw drop (raw_uri)",
    }
    for branch in ("cohort", "drop"):
        ingest = tasks_of(spec, branch)["ingest"]["inputs"]
        assert ingest["parameters"]["raw_uri"] == {"componentInputParameter": "pipelinechannel--raw_uri"}, branch
    assert "raw" not in tasks_of(spec, "drop")["ingest"]["inputs"].get("artifacts", {})  # it fetches raw_uri


def test_raw_uri_default_from_params_or_argument(params: Params, tmp_path: Path) -> None:
    spec, _ = load_ir(compile_pipeline(apply_overrides(params, ["ingest.raw_uri=s3://b/x"]), tmp_path / "p.yaml"))
    assert spec["root"]["inputDefinitions"]["parameters"]["raw_uri"]["defaultValue"] == "s3://b/x"
    spec, _ = load_ir(compile_pipeline(params, tmp_path / "q.yaml", raw_uri="dvc://?path=data/raw&rev=v1"))
    assert spec["root"]["inputDefinitions"]["parameters"]["raw_uri"]["defaultValue"] == "dvc://?path=data/raw&rev=v1"


def test_both_branches_are_the_same_tasks(compiled: tuple[dict[str, Any], dict[str, Any]]) -> None:
    """The raw-drop branch's tasks: same component interface, container, Kubernetes settings, caching,
    retries and wiring as the cohort branch's (``-2`` names aside), but ingest reads no cohort and is not
    cached."""
    spec, platform = compiled
    kubernetes = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    executors = spec["deploymentSpec"]["executors"]

    def renamed(value: Any) -> str:
        return json.dumps(value, sort_keys=True).replace("-2", "")

    cohort, drop = tasks_of(spec, "cohort"), tasks_of(spec, "drop")
    for stage, task in drop.items():
        first = cohort[stage]
        if stage == "ingest":  # reads no cohort, and is never cached: the drop behind a URI may change
            assert task["cachingOptions"] == {} and first["cachingOptions"] == {"enableCache": True}
            first = {**first, "inputs": {"parameters": first["inputs"]["parameters"]}, "dependentTasks": [],
                     "cachingOptions": {}}
            task = {**task, "dependentTasks": task.get("dependentTasks", [])}
        assert renamed({k: v for k, v in task.items() if k != "componentRef"}) == renamed(
            {k: v for k, v in first.items() if k != "componentRef"}
        ), stage
        first_component = spec["components"][first["componentRef"]["name"]]
        component = spec["components"][task["componentRef"]["name"]]
        assert renamed({k: v for k, v in component.items() if k != "executorLabel"}) == renamed(
            {k: v for k, v in first_component.items() if k != "executorLabel"}
        ), stage
        label, first_label = component["executorLabel"], first_component["executorLabel"]
        assert executors[label] == executors[first_label], stage
        assert kubernetes.get(label) == kubernetes.get(first_label), stage


def test_dependencies(compiled: tuple[dict[str, Any], dict[str, Any]]) -> None:
    tasks = tasks_of(compiled[0])
    depends = {name: set(task.get("dependentTasks", [])) for name, task in tasks.items()}
    assert depends["cohort"] == set()
    assert depends["ingest"] == {"cohort"}
    for name in set(PIPELINE_STAGES) - {"cohort", "ingest", "preprocess"}:  # also read ingest's data_version
        assert "ingest" in depends[name], name
        depends[name] -= {"ingest"}
    assert depends["preprocess"] == {"ingest"}
    assert depends["train"] == {"preprocess"}
    for name in DOWNSTREAM_OF_TRAIN:
        # after train, and in parallel with each other
        assert "train" in depends[name]
        assert not depends[name] & set(DOWNSTREAM_OF_TRAIN)
    # the gate reads the evaluation; its model card the explanation scores and the data card
    assert depends["promote"] == {"preprocess", "train", "evaluate", "explain"}


def test_artifacts_wire_stage_outputs_to_inputs(compiled: tuple[dict[str, Any], dict[str, Any]]) -> None:
    tasks = tasks_of(compiled[0])

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
        # cohort comes before any data version; ingest computes it from what it read; the others receive it
        expected = {"cohort": {"params_json"}, "ingest": {"params_json", "raw_uri"}}.get(
            stage, {"params_json", "data_version"}
        )
        assert set(component["inputDefinitions"]["parameters"]) == expected, stage
    ingest = spec["components"]["comp-ingest"]
    assert ingest["inputDefinitions"]["artifacts"]["raw"]["isOptional"] is True  # absent when raw_uri is given
    assert ingest["outputDefinitions"]["parameters"]["data_version"] == {"parameterType": "STRING"}


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
    return {task: executors.get(executor_of(spec, task), {}) for task in tasks_of(spec)}


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
    tasks = tasks_of(spec)
    return {name: task["cachingOptions"].get("enableCache", False) for name, task in tasks.items()}


def test_caching_on_for_deterministic_stages_off_for_training(compiled: tuple[dict[str, Any], dict[str, Any]]) -> None:
    assert caching(compiled[0]) == {stage: stage not in {"train", *NEVER_CACHED} for stage in KFP_TASKS}


def test_caching_training_when_asked(params: Params, tmp_path: Path) -> None:
    spec, _ = load_ir(compile_pipeline(apply_overrides(params, ["pipeline.cache_training=true"]), tmp_path / "p.yaml"))
    assert caching(spec) == {stage: stage not in NEVER_CACHED for stage in KFP_TASKS}


def test_credentials_secret_name_from_params(params: Params, tmp_path: Path) -> None:
    spec, platform = load_ir(
        compile_pipeline(apply_overrides(params, ["pipeline.credentials_secret=team-a-creds"]), tmp_path / "p.yaml")
    )
    for stage, config in kubernetes_executors(spec, platform).items():
        (secret,) = config["secretAsEnv"]
        assert secret["secretName"] == "team-a-creds", stage
        assert {m["envVar"] for m in secret["keyToEnv"]} >= {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}


def test_data_version_is_ingests_output(compiled: tuple[dict[str, Any], dict[str, Any]]) -> None:
    """No ``data_version`` pipeline parameter: every task after ingest reads ingest's output of that name."""
    spec, _ = compiled
    assert set(spec["root"]["inputDefinitions"]["parameters"]) == {"params_json", "raw_uri", "external_uri"}
    for branch in ("cohort", "drop"):
        tasks = tasks_of(spec, branch)
        ingest = next(name for name, task in spec["components"][branches(spec)[branch]["componentRef"]["name"]][
            "dag"]["tasks"].items() if task["taskInfo"]["name"] == "ingest")
        for name, task in tasks.items():
            parameters = task["inputs"]["parameters"]
            assert parameters["params_json"] == {"componentInputParameter": "pipelinechannel--params_json"}, name
            if name in ("cohort", "ingest", "external"):  # external: the hash of the external drop it reads
                assert "data_version" not in parameters, name
            else:
                assert parameters["data_version"] == {
                    "taskOutputParameter": {"outputParameterKey": "data_version", "producerTask": ingest}
                }, (branch, name)


def test_credentials_from_optional_secret(compiled: tuple[dict[str, Any], dict[str, Any]]) -> None:
    spec, platform = compiled
    kubernetes = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for stage in PIPELINE_STAGES:
        (secret,) = kubernetes[executor_of(spec, stage)]["secretAsEnv"]
        assert secret["secretName"] == CREDENTIALS_SECRET
        assert secret["optional"] is True
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= {m["envVar"] for m in secret["keyToEnv"]}


def test_retries_with_backoff_on_io_stages(compiled: tuple[dict[str, Any], dict[str, Any]]) -> None:
    tasks = tasks_of(compiled[0])
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
        "--set", "pipeline.cache_training=true", "--raw-uri", "s3://raw/2026-11", "--output", str(output),
    ]
    assert main(argv) == 0
    assert f"wrote {output}" in capsys.readouterr().out
    spec, _ = load_ir(output)
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert json.loads(parameters["params_json"]["defaultValue"])["train"]["epochs"] == 2
    assert parameters["raw_uri"]["defaultValue"] == "s3://raw/2026-11"
    assert caching(spec)["train"] is True
