"""Multi-GPU training as a Kubeflow Trainer TrainJob: the compiled launcher task, the TrainJob the Kubeflow SDK
builds from it, and the submit / follow / fail logic against a stand-in TrainerClient (no cluster)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubeflow.trainer.backends.kubernetes.backend import KubernetesBackend
from kubeflow.trainer.types.types import Event, Runtime, RuntimeKind, RuntimeTrainer, Step, TrainerType, TrainJob
from kubernetes.client import ApiException
from meddiff_components.stages import GPU_IMAGE_ENV, IMAGE_ENV
from meddiff_components.trainjob import (
    CREDENTIAL_KEYS,
    LAUNCHER_RESOURCES,
    TRAINJOB_IMAGE_ENV,
    SharedRun,
    build_trainjob,
    trainjob_name,
)
from meddiff_components.trainjob_run import (
    COMPLETE,
    FAILED,
    LOG_TAIL_LINES,
    RUNNING,
    MeddiffTrainerClient,
    TrainJobFailedError,
    run_train,
    submit,
    train_as_trainjob,
)
from meddiff_pipelines.pipeline import CREDENTIAL_KEYS as PIPELINE_CREDENTIAL_KEYS
from meddiff_pipelines.pipeline import compile_pipeline

from meddiff.config import Params, apply_overrides, load_params, params_from_dict
from meddiff.data.dataset import ARRAYS_FILE
from meddiff.stages import DATA_VERSION_ENV

REPO = Path(__file__).resolve().parents[2]
GPU_IMAGE = "registry.local/meddiff:dev-cuda"
RUN_KEY = "0123456789abcdef"
#: The torch-distributed ClusterTrainingRuntime of Kubeflow Trainer v2.3.0
#: (manifests/base/runtimes/torch_distributed.yaml), as the API server returns it.
TORCH_DISTRIBUTED = {
    "apiVersion": "trainer.kubeflow.org/v1alpha1",
    "kind": "ClusterTrainingRuntime",
    "metadata": {"name": "torch-distributed", "labels": {"trainer.kubeflow.org/framework": "torch"}},
    "spec": {
        "mlPolicy": {"numNodes": 1, "torch": {}},
        "template": {"spec": {"replicatedJobs": [{
            "name": "node",
            "template": {
                "metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
                "spec": {"template": {"spec": {"containers": [
                    {"name": "node", "image": "pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime"},
                ]}}},
            },
        }]}},
    },
}


@pytest.fixture(autouse=True)
def _no_image_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (IMAGE_ENV, GPU_IMAGE_ENV, TRAINJOB_IMAGE_ENV, "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)


def two_nodes(**overrides: str) -> Params:
    settings = ["train.nodes=2", "train.gpus_per_node=4", *(f"{k}={v}" for k, v in overrides.items())]
    return apply_overrides(load_params(REPO / "params.yaml"), settings)


# --------------------------------------------------------------------------------------------------
# The compiled pipeline and the TrainJob the SDK builds from it
# --------------------------------------------------------------------------------------------------


class _Done:
    """What a kubernetes client call with ``async_req=True`` returns."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def get(self, timeout: float | None = None) -> Any:
        return self.value


@dataclass
class FakeCustomObjects:
    """The CustomObjectsApi calls the SDK makes to submit a TrainJob: no namespaced runtime, the cluster
    runtime above, no job yet; records what is created."""

    created: list[dict[str, Any]] = field(default_factory=list)
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)

    def get_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str, name: str,
                                     async_req: bool = False) -> Any:
        if plural == "trainjobs" and name in self.resources:
            return self.resources[name]
        raise ApiException(status=404, reason="Not Found")

    def get_cluster_custom_object(self, group: str, version: str, plural: str, name: str,
                                  async_req: bool = False) -> _Done:
        assert (group, plural, name) == ("trainer.kubeflow.org", "clustertrainingruntimes", "torch-distributed")
        return _Done(TORCH_DISTRIBUTED)

    def list_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str,
                                      async_req: bool = False) -> _Done:
        return _Done({"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJobList", "items": []})

    def create_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str,
                                        body: dict[str, Any]) -> dict[str, Any]:
        assert (group, version, namespace, plural) == ("trainer.kubeflow.org", "v1alpha1", "kubeflow", "trainjobs")
        self.created.append(body)
        return body


def sdk_client(api: FakeCustomObjects) -> MeddiffTrainerClient:
    """The real TrainerClient and Kubernetes backend of the SDK over a stand-in API (no kubeconfig)."""
    backend = KubernetesBackend.__new__(KubernetesBackend)
    backend.custom_api, backend.core_api, backend.namespace = api, None, "kubeflow"
    client = MeddiffTrainerClient.__new__(MeddiffTrainerClient)
    client.backend = backend
    return client


def compiled_train_task(params: Params, tmp_path: Path) -> tuple[dict, dict, dict]:
    """(container, Kubernetes platform config, pipeline spec) of the compiled train task."""
    output = compile_pipeline(params, tmp_path / "pipeline.yaml", image="registry.local/meddiff:dev",
                              gpu_image=GPU_IMAGE)
    spec, platform = yaml.safe_load_all(output.read_text())
    container = spec["deploymentSpec"]["executors"]["exec-train"]["container"]
    kubernetes = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]
    return container, kubernetes, spec


def test_two_node_pipeline_submits_the_trainjob_the_sdk_builds(tmp_path: Path) -> None:
    container, kubernetes, spec = compiled_train_task(two_nodes(), tmp_path)
    # The launcher task: no GPU (its TrainJob's nodes have them), the shared volume, the TrainJob image.
    assert "accelerator" not in container["resources"]
    assert container["resources"]["resourceCpuRequest"] == LAUNCHER_RESOURCES.cpu_request
    assert "tolerations" not in kubernetes and "nodeSelector" not in kubernetes
    assert kubernetes["pvcMount"] == [{"constant": "meddiff-training", "mountPath": "/mnt/meddiff",
                                       "pvcNameParameter": {"runtimeValue": {"constant": "meddiff-training"}}}]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env == {TRAINJOB_IMAGE_ENV: GPU_IMAGE} == {TRAINJOB_IMAGE_ENV: container["image"]}
    assert int(kubernetes["activeDeadlineSeconds"]) == 21600

    # What the task submits at run time, from the compiled params and image, through the SDK.
    params_json = spec["root"]["inputDefinitions"]["parameters"]["params_json"]["defaultValue"]
    params = params_from_dict(json.loads(params_json))
    run = SharedRun.for_params(params, trainjob_name(RUN_KEY))
    request = build_trainjob(params, env[TRAINJOB_IMAGE_ENV], run, RUN_KEY,
                             env={"MLFLOW_TRACKING_URI": "http://mlflow.meddiff.svc.cluster.local:5000"})
    api = FakeCustomObjects()
    assert submit(sdk_client(api), request, log=lambda line: None) == "meddiff-train-0123456789ab"
    (job,) = api.created

    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert job["metadata"]["name"] == "meddiff-train-0123456789ab"
    assert job["metadata"]["labels"] == {"app.kubernetes.io/part-of": "meddiff", "meddiff.io/run-key": RUN_KEY[:12]}
    assert job["spec"]["runtimeRef"] == {"name": "torch-distributed", "kind": "ClusterTrainingRuntime"}
    assert job["spec"]["activeDeadlineSeconds"] == 21600
    trainer = job["spec"]["trainer"]
    assert trainer["numNodes"] == 2
    assert "numProcPerNode" not in trainer  # v2.2+: torchrun's auto, one process per GPU of the node
    per_node = {"nvidia.com/gpu": "4", "cpu": "16", "memory": "64Gi"}  # 4 × the one-GPU train pod
    assert trainer["resourcesPerNode"] == {"requests": per_node, "limits": per_node}
    assert trainer["image"] == GPU_IMAGE
    assert trainer["command"] == ["torchrun"]
    root = "/mnt/meddiff/runs/meddiff-train-0123456789ab"
    assert trainer["args"] == ["-m", "meddiff.cli", "train", "--params", f"{root}/params.yaml",
                               "--processed-dir", f"{root}/processed", "--model-dir", f"{root}/model"]
    assert {e["name"]: e["value"] for e in trainer["env"]} == {
        "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": "http://mlflow.meddiff.svc.cluster.local:5000",
    }
    # Credentials reach the nodes as references to the Secret, never as values stored in the TrainJob.
    (patch,) = job["spec"]["runtimePatches"]
    assert patch["manager"] == "trainer.kubeflow.org/kubeflow-sdk"
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node"
    pod = node["template"]["spec"]["template"]["spec"]
    (node_container,) = pod["containers"]
    assert node_container["name"] == "node"
    assert node_container["env"] == [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": "meddiff-credentials", "key": key, "optional": True}}}
        for key in CREDENTIAL_KEYS
    ]
    # Checkpoints, data and model on the shared volume, mounted where the launcher mounts it.
    assert {"name": "meddiff-shared", "mountPath": "/mnt/meddiff"} in node_container["volumeMounts"]
    assert {"name": "meddiff-shared", "persistentVolumeClaim": {"claimName": "meddiff-training"}} in pod["volumes"]
    assert str(run.checkpoints) == "/mnt/meddiff/checkpoints"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["securityContext"] == {"fsGroup": 10001}


def test_one_gpu_pipeline_trains_in_the_task_pod(tmp_path: Path) -> None:
    container, kubernetes, _ = compiled_train_task(load_params(REPO / "params.yaml"), tmp_path)
    assert container["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert "env" not in container and "pvcMount" not in kubernetes


def test_nodes_share_the_pipeline_credential_keys() -> None:
    assert CREDENTIAL_KEYS == PIPELINE_CREDENTIAL_KEYS


def test_checkpoints_stay_on_the_shared_volume() -> None:
    assert SharedRun.for_params(two_nodes(**{"paths.checkpoints": "/mnt/meddiff/ckpt"}), "j").checkpoints.as_posix() \
        == "/mnt/meddiff/ckpt"
    with pytest.raises(ValueError, match="outside the shared volume"):
        SharedRun.for_params(two_nodes(**{"paths.checkpoints": "/tmp/ckpt"}), "j")
    with pytest.raises(ValueError, match="absolute"):
        SharedRun.for_params(two_nodes(**{"pipeline.shared_volume_path": "mnt"}), "j")
    with pytest.raises(ValueError, match="one GPU trains in the task's pod"):
        build_trainjob(load_params(REPO / "params.yaml"), GPU_IMAGE, SharedRun.for_params(two_nodes(), "j"), RUN_KEY)


def test_failure_condition_is_read_from_the_trainjob_resource() -> None:
    api = FakeCustomObjects(resources={"job": {"status": {"conditions": [
        {"type": "Created", "status": "True", "reason": "JobsCreationSucceeded", "message": "created"},
        {"type": "Failed", "status": "True", "reason": "DeadlineExceeded", "message": "ran past 21600 s"},
    ]}}})
    assert sdk_client(api).failure_condition("job") == "DeadlineExceeded: ran past 21600 s"


# --------------------------------------------------------------------------------------------------
# Submit, follow, fail: against a stand-in TrainerClient
# --------------------------------------------------------------------------------------------------

RUNTIME = Runtime("torch-distributed", RuntimeTrainer(TrainerType.CUSTOM_TRAINER, "torch", "img"),
                  RuntimeKind.CLUSTER_TRAINING_RUNTIME)


def trainjob(name: str, status: str, steps: list[Step] | None = None) -> TrainJob:
    return TrainJob(name, RUNTIME, steps or [], 2, datetime(2026, 8, 1, tzinfo=UTC), status)


@dataclass
class FakeTrainer:
    """A TrainerClient whose one job goes through ``statuses`` (one per wait); on submission it plays rank 0
    and writes the model where the job's ``--model-dir`` argument says."""

    statuses: list[str]
    existing: list[TrainJob] = field(default_factory=list)
    logs: dict[str, list[str]] = field(default_factory=dict)
    condition: str = ""
    submitted: list[dict[str, Any]] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    failed_steps: list[str] = field(default_factory=list)

    def train(self, runtime: str | None = None, initializer: None = None, trainer: Any = None,
              options: list | None = None) -> str:
        self.submitted.append({"runtime": runtime, "trainer": trainer, "options": options})
        args = next(option.args for option in options or [] if hasattr(option, "args"))
        model = Path(args[args.index("--model-dir") + 1])
        model.mkdir(parents=True)
        (model / "run.json").write_text(json.dumps({"epochs_run": 3, "best_val_auc": 0.75}))
        (model / "model.safetensors").write_bytes(b"weights")
        return next(option.name for option in options or [] if hasattr(option, "name"))

    def list_jobs(self, runtime: Any = None) -> list[TrainJob]:
        return self.existing

    def delete_job(self, name: str) -> None:
        self.deleted.append(name)

    def wait_for_job_status(self, name: str, status: set[str], timeout: int, polling_interval: int,
                            callbacks: Any = None) -> TrainJob:
        assert timeout > polling_interval
        current = self.statuses.pop(0)
        assert current in status
        steps = [Step(step, FAILED if step in self.failed_steps else current, f"{name}-{step}-pod")
                 for step in ("node-0", "node-1")]
        return trainjob(name, current, steps)

    def get_job_logs(self, name: str, step: str = "node-0", follow: bool | None = False) -> Iterator[str]:
        yield from self.logs.get(step, [])

    def get_job_events(self, name: str) -> list[Event]:
        return [Event("JobSet", name, "jobset failed: job node-1 reached its backoff limit", "FailedJobs",
                      datetime(2026, 8, 1, tzinfo=UTC))]

    def failure_condition(self, name: str) -> str:
        return self.condition


@pytest.fixture
def processed(tmp_path: Path) -> Path:
    folder = tmp_path / "processed"
    folder.mkdir()
    (folder / ARRAYS_FILE).write_bytes(b"arrays")
    (folder / "splits.json").write_text("{}")
    return folder


def shared_params(tmp_path: Path) -> Params:
    return two_nodes(**{"pipeline.shared_volume_path": str(tmp_path / "shared")})


def test_trainjob_that_succeeds(tmp_path: Path, processed: Path) -> None:
    fake = FakeTrainer([RUNNING, COMPLETE], logs={"node-0": ["epoch 1 loss 1.2", "epoch 2 loss 0.9"]})
    lines: list[str] = []
    result = train_as_trainjob(shared_params(tmp_path), GPU_IMAGE, processed, tmp_path / "model", fake,
                               log=lines.append, poll_s=1)

    assert result == {"epochs_run": 3, "best_val_auc": 0.75}
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == b"weights"  # copied to the artifact
    assert "epoch 1 loss 1.2" in lines and "epoch 2 loss 0.9" in lines  # rank 0's log, streamed
    (call,) = fake.submitted
    assert call["runtime"] == "torch-distributed" and call["trainer"].num_nodes == 2
    (run_root,) = (tmp_path / "shared" / "runs").iterdir()
    assert (run_root / "processed" / ARRAYS_FILE).read_bytes() == b"arrays"  # staged for the nodes
    job_params = yaml.safe_load((run_root / "params.yaml").read_text())
    assert job_params["paths"]["checkpoints"] == str(tmp_path / "shared" / "checkpoints")
    assert job_params["train"]["nodes"] == 2


def test_trainjob_that_fails_fails_the_task(tmp_path: Path, processed: Path) -> None:
    log = [f"step {i}" for i in range(100)] + ["RuntimeError: NCCL error: unhandled system error"]
    fake = FakeTrainer([RUNNING, FAILED], logs={"node-1": log}, failed_steps=["node-1"],
                       condition="JobSetFailed: jobset failed")
    with pytest.raises(TrainJobFailedError) as failure:
        train_as_trainjob(shared_params(tmp_path), GPU_IMAGE, processed, tmp_path / "model", fake,
                          log=lambda line: None, poll_s=1)
    message = str(failure.value)
    assert message.startswith("TrainJob meddiff-train-")
    assert "failed: JobSetFailed: jobset failed" in message
    assert "FailedJobs: jobset failed: job node-1 reached its backoff limit" in message
    assert "NCCL error: unhandled system error" in message  # the failed node's log tail
    assert f"last {LOG_TAIL_LINES} log lines of node-1" in message
    lines = message.splitlines()
    assert "  step 60" not in lines and "  step 61" in lines  # only the last 40 lines: 61-99 and the error
    assert not (tmp_path / "model").exists()


def test_running_job_of_the_same_run_is_followed_not_submitted_again(tmp_path: Path, processed: Path) -> None:
    params = shared_params(tmp_path)
    first = FakeTrainer([RUNNING, COMPLETE])
    train_as_trainjob(params, GPU_IMAGE, processed, tmp_path / "m1", first, log=lambda line: None, poll_s=1)
    name = first.submitted[0]["options"][0].name
    again = FakeTrainer([RUNNING, COMPLETE], existing=[trainjob(name, RUNNING)])
    assert train_as_trainjob(params, GPU_IMAGE, processed, tmp_path / "m2", again, log=lambda line: None,
                             poll_s=1)["epochs_run"] == 3
    assert again.submitted == [] and again.deleted == []
    finished = FakeTrainer([RUNNING, COMPLETE], existing=[trainjob(name, FAILED)])
    (tmp_path / "shared" / "runs" / name / "model" / "run.json").unlink()  # the new attempt writes it again
    (tmp_path / "shared" / "runs" / name / "model" / "model.safetensors").unlink()
    (tmp_path / "shared" / "runs" / name / "model").rmdir()
    train_as_trainjob(params, GPU_IMAGE, processed, tmp_path / "m3", finished, log=lambda line: None, poll_s=1)
    assert finished.deleted == [name] and len(finished.submitted) == 1


@dataclass
class _Artifact:
    path: str


def test_task_and_compiled_pipeline_must_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    artifacts = {"processed": _Artifact(str(tmp_path / "p")), "model": _Artifact(str(tmp_path / "m"))}
    with pytest.raises(ValueError, match=f"asks for 8 GPUs .*{TRAINJOB_IMAGE_ENV}"):
        run_train(json.dumps(two_nodes().to_dict()), "v1", FakeTrainer([]), **artifacts)
    monkeypatch.setenv(TRAINJOB_IMAGE_ENV, GPU_IMAGE)
    with pytest.raises(ValueError, match="asks for one GPU"):
        run_train(json.dumps(load_params(REPO / "params.yaml").to_dict()), "v1", FakeTrainer([]), **artifacts)


def test_task_runs_the_trainjob_and_returns_its_result(
    tmp_path: Path, processed: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TRAINJOB_IMAGE_ENV, GPU_IMAGE)
    monkeypatch.setenv(DATA_VERSION_ENV, "")  # restored after the test: the task exports the run's version
    fake = FakeTrainer([RUNNING, COMPLETE])
    result = run_train(json.dumps(shared_params(tmp_path).to_dict()), "data-v7", fake,
                       processed=_Artifact(str(processed)), model=_Artifact(str(tmp_path / "model")))
    assert result == {"epochs_run": 3, "best_val_auc": 0.75, "data_version": "data-v7"}
    assert fake.submitted[0]["trainer"].image == GPU_IMAGE
    assert fake.submitted[0]["trainer"].env["MEDDIFF_DATA_VERSION"] == "data-v7"
    assert (tmp_path / "model" / "run.json").is_file()
