"""The Kubeflow Trainer ``TrainJob`` that trains meddiff on several GPUs or nodes (pure: no cluster access).

When ``train.nodes × train.gpus_per_node > 1`` the pipeline's train task does not train in its own pod: it
stages its input on a shared volume and submits a ``TrainJob`` on the ``torch-distributed`` runtime
(:mod:`meddiff_components.trainjob_run`). This module builds that job as Kubeflow SDK objects
(``kubeflow==0.5.0``: :class:`~kubeflow.trainer.CustomTrainerContainer` plus ``kubeflow.trainer.options``),
for Kubeflow Trainer v2.3 (API ``trainer.kubeflow.org/v1alpha1``), whose Torch plugin no longer has
``numProcPerNode`` or ``ElasticPolicy``: it injects ``PET_NNODES``, ``PET_NPROC_PER_NODE`` (``auto``: one
process per GPU of the node's resources), ``PET_NODE_RANK``, ``PET_MASTER_ADDR`` and ``PET_MASTER_PORT``,
which ``torchrun`` reads as its defaults. Every node therefore runs the same entry point as a local run::

    torchrun -m meddiff.cli train --params <run>/params.yaml --processed-dir <run>/processed --model-dir <run>/model

Shared storage is a ReadWriteMany PersistentVolumeClaim (``pipeline.shared_volume``) mounted at
``pipeline.shared_volume_path`` in the train task and in every TrainJob pod. It holds, per run (the
training run key: params and data), the staged processed data, the params, the model rank 0 writes, and
the resumable checkpoints (``paths.checkpoints``, relative to the mount): a TrainJob restarted after a
failure, or submitted again for the same params and data, resumes from the last checkpoint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from kubeflow.trainer import CustomTrainerContainer
from kubeflow.trainer.options import (
    ActiveDeadlineSeconds,
    ContainerPatch,
    JobSetSpecPatch,
    JobSetTemplatePatch,
    JobSpecPatch,
    JobTemplatePatch,
    Labels,
    Name,
    PodSpecPatch,
    PodTemplatePatch,
    ReplicatedJobPatch,
    RuntimePatch,
    TrainerArgs,
    TrainerCommand,
    TrainingRuntimeSpecPatch,
)

from meddiff.config import Params, TrainConfig
from meddiff.stage_table import STAGES, Resources

#: The Kubeflow Trainer release this module targets (TrainJob API trainer.kubeflow.org/v1alpha1).
TRAINER_VERSION = "v2.3.0"
#: Replicated job and container of the torch-distributed runtime that run the trainer (``node``).
TRAINER_NODE = "node"
#: Launcher of every node: torchrun, configured by the PET_* variables the Torch plugin injects.
TORCHRUN_COMMAND: tuple[str, ...] = ("torchrun",)
#: The training entry point, the same as ``meddiff train`` (the images' ENTRYPOINT) and a local torchrun.
TRAIN_MODULE_ARGS: tuple[str, ...] = ("-m", "meddiff.cli", "train")
#: Environment variable of the train task: the image of its TrainJob (set when the pipeline is compiled).
TRAINJOB_IMAGE_ENV = "MEDDIFF_TRAINJOB_IMAGE"
#: Environment variables passed from the train task to every node when set there (no secrets).
FORWARDED_ENV: tuple[str, ...] = ("MLFLOW_TRACKING_URI", "MEDDIFF_DATA_VERSION", "MEDDIFF_GIT_COMMIT")
#: Keys of the credentials Secret: every pipeline task gets them as environment variables
#: (``meddiff_pipelines.pipeline`` imports this list) and every TrainJob node as optional ``secretKeyRef``s.
CREDENTIAL_KEYS: tuple[str, ...] = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "MLFLOW_S3_ENDPOINT_URL",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
)
#: Labels of every pod of the pipeline (its tasks and TrainJob nodes): the NetworkPolicies of infra/ admit
#: exactly these pods, from the pipeline's namespace, to MLflow and the object store (infra/README.md).
PIPELINE_POD_LABELS: dict[str, str] = {"meddiff.io/pipeline-pod": "true"}
#: The images run as this uid (docker/); the shared volume is group-writable for it through fsGroup.
IMAGE_UID = 10001
#: NCCL and DataLoader workers exchange tensors through /dev/shm, which is 64 MiB in a pod by default.
SHM_VOLUME = "dshm"
SHARED_VOLUME = "meddiff-shared"
#: Pod of the train task while its TrainJob trains: it copies data and follows the job, no GPU.
LAUNCHER_RESOURCES = Resources("1", "2Gi", "8Gi")
#: Labels of every TrainJob meddiff submits (the run key's label: the first JOB_NAME_KEY_CHARS digits).
PART_OF_LABELS = {"app.kubernetes.io/part-of": "meddiff"}
RUN_KEY_LABEL = "meddiff.io/run-key"
#: Taint of the GPU pool (infra/README.md), tolerated by every node.
GPU_TAINT_KEY = "nvidia.com/gpu"
#: TrainJob names are DNS-1035 labels; the JobSet and pod names derived from them must stay below 63.
JOB_NAME_PREFIX = "meddiff-train-"
JOB_NAME_KEY_CHARS = 12
_GI = re.compile(r"^(\d+)Gi$")


def world_size(train: TrainConfig) -> int:
    """Training processes in all: ``nodes × gpus_per_node``."""
    return train.nodes * train.gpus_per_node


def is_distributed(train: TrainConfig) -> bool:
    """True when training runs as a TrainJob (more than one GPU), False when it runs in the task's pod."""
    return world_size(train) > 1


def trainjob_name(run_key: str) -> str:
    """The TrainJob of a training run: one name per run key, so a resubmitted task finds its job again."""
    if len(run_key) < JOB_NAME_KEY_CHARS or not re.fullmatch(r"[0-9a-f]+", run_key):
        raise ValueError(f"run key {run_key!r}: expected at least {JOB_NAME_KEY_CHARS} lowercase hex digits")
    return JOB_NAME_PREFIX + run_key[:JOB_NAME_KEY_CHARS]


@dataclass(frozen=True)
class SharedRun:
    """Where one distributed training run lives on the shared volume (paths as the pods see them).

    Attributes:
        mount: the mount path of the shared volume (``pipeline.shared_volume_path``), absolute.
        job_name: the TrainJob's name (:func:`trainjob_name`); the run's folder is ``<mount>/runs/<job_name>``.
        checkpoints: ``paths.checkpoints`` resolved on the volume (``<mount>/checkpoints`` by default); the
            training stage keeps each run's state under ``<checkpoints>/<run key>``.
    """

    mount: PurePosixPath
    job_name: str
    checkpoints: PurePosixPath

    @classmethod
    def for_params(cls, params: Params, job_name: str) -> SharedRun:
        """The run's layout on ``params.pipeline.shared_volume_path``.

        Raises:
            ValueError: the mount path is relative, or an absolute ``paths.checkpoints`` lies outside the
                shared volume (it would not be shared between nodes, nor survive a restart).
        """
        mount = PurePosixPath(params.pipeline.shared_volume_path)
        if not mount.is_absolute():
            raise ValueError(f"pipeline.shared_volume_path must be an absolute path, got {str(mount)!r}")
        checkpoints = mount / PurePosixPath(params.paths.checkpoints)  # an absolute path replaces the mount
        if not checkpoints.is_relative_to(mount):
            raise ValueError(
                f"paths.checkpoints={params.paths.checkpoints} is outside the shared volume {mount}: a multi-GPU "
                "run keeps its checkpoints there (use a relative path, or one under pipeline.shared_volume_path)"
            )
        return cls(mount, job_name, checkpoints)

    @property
    def root(self) -> PurePosixPath:
        return self.mount / "runs" / self.job_name

    @property
    def processed(self) -> PurePosixPath:
        """The processed data the train task copies from its input artifact."""
        return self.root / "processed"

    @property
    def params_file(self) -> PurePosixPath:
        """The run's params, with ``paths.checkpoints`` pointing at :attr:`checkpoints`."""
        return self.root / "params.yaml"

    @property
    def model(self) -> PurePosixPath:
        """The trained model rank 0 writes; the train task copies it to its output artifact."""
        return self.root / "model"


@dataclass(frozen=True)
class TrainJobRequest:
    """The arguments of ``TrainerClient.train`` for one run: the runtime's name, the trainer, the options."""

    name: str
    runtime: str
    trainer: CustomTrainerContainer
    options: tuple[object, ...]


def train_args(run: SharedRun) -> list[str]:
    """The arguments of :data:`TORCHRUN_COMMAND` on every node: the ``meddiff train`` entry point."""
    return [
        *TRAIN_MODULE_ARGS,
        "--params", str(run.params_file),
        "--processed-dir", str(run.processed),
        "--model-dir", str(run.model),
    ]


def resources_per_node(train: TrainConfig, per_gpu: Resources | None = None) -> dict[str, str]:
    """``resources_per_node`` of the SDK: the train stage's one-GPU pod (stage table) times the node's GPUs.

    The SDK sets requests and limits alike (``gpu`` becomes ``nvidia.com/gpu``); the memory is the stage's
    request, since a node is sized for its GPUs, not for bursts. Quantities are strings: the SDK turns
    numbers into floats (``4.0``).

    Raises:
        ValueError: the stage table's CPU is not whole cores or its memory is not in ``Gi``.
    """
    per_gpu = per_gpu or STAGES["train"].resources
    memory = _GI.match(per_gpu.memory_request)
    if not per_gpu.cpu_request.isdigit() or memory is None:
        raise ValueError(
            f"train resources {per_gpu}: expected whole CPU cores and a memory request in Gi to scale per GPU"
        )
    gpus = train.gpus_per_node
    return {"gpu": str(gpus), "cpu": str(int(per_gpu.cpu_request) * gpus), "memory": f"{int(memory.group(1)) * gpus}Gi"}


def _node_pod_patch(params: Params, run: SharedRun) -> RuntimePatch:
    """Shared volume, /dev/shm, credentials from the Secret, GPU pool selector and toleration of every node."""
    settings = params.pipeline
    credentials = [
        {
            "name": key,
            "valueFrom": {"secretKeyRef": {"name": settings.credentials_secret, "key": key, "optional": True}},
        }
        for key in CREDENTIAL_KEYS
    ]
    container = ContainerPatch(
        name=TRAINER_NODE,
        env=credentials,
        volume_mounts=[
            {"name": SHARED_VOLUME, "mountPath": str(run.mount)},
            {"name": SHM_VOLUME, "mountPath": "/dev/shm"},
        ],
    )
    pod = PodSpecPatch(
        volumes=[
            {"name": SHARED_VOLUME, "persistentVolumeClaim": {"claimName": settings.shared_volume}},
            {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}},
        ],
        containers=[container],
        security_context={"fsGroup": IMAGE_UID},
        node_selector=dict(settings.gpu_node_selector) or None,
        tolerations=[{"key": GPU_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}],
    )
    node_job = ReplicatedJobPatch(
        name=TRAINER_NODE,
        template=JobTemplatePatch(
            spec=JobSpecPatch(template=PodTemplatePatch(metadata={"labels": dict(PIPELINE_POD_LABELS)}, spec=pod))
        ),
    )
    return RuntimePatch(
        training_runtime_spec=TrainingRuntimeSpecPatch(
            template=JobSetTemplatePatch(spec=JobSetSpecPatch(replicated_jobs=[node_job]))
        )
    )


def build_trainjob(
    params: Params, image: str, run: SharedRun, run_key: str, env: dict[str, str] | None = None
) -> TrainJobRequest:
    """The TrainJob of a multi-GPU training run, as Kubeflow SDK objects.

    Args:
        params: the run's params; ``train.nodes``, ``train.gpus_per_node`` size the job, ``pipeline`` names
            the runtime, the Secret, the shared volume, the GPU pool and the deadline (``timeouts.train``).
        image: the image every node runs (the train task's own image).
        run: the run's paths on the shared volume.
        run_key: the training run key (:func:`meddiff.training.train.run_key`), a label of the job.
        env: plain environment variables of every node (no secrets: they are stored in the TrainJob).

    Returns:
        What ``TrainerClient.train(runtime=..., trainer=..., options=...)`` takes.

    Raises:
        ValueError: training fits one GPU (train in the task's pod instead).
    """
    if not is_distributed(params.train):
        raise ValueError(
            f"train.nodes × train.gpus_per_node = {world_size(params.train)}: one GPU trains in the task's pod, "
            "not as a TrainJob"
        )
    trainer = CustomTrainerContainer(
        image=image,
        num_nodes=params.train.nodes,
        resources_per_node=resources_per_node(params.train),
        env={"PYTHONUNBUFFERED": "1", **(env or {})},
    )
    options: list[object] = [
        Name(run.job_name),
        Labels({**PART_OF_LABELS, RUN_KEY_LABEL: run_key[:JOB_NAME_KEY_CHARS]}),
        TrainerCommand(list(TORCHRUN_COMMAND)),
        TrainerArgs(train_args(run)),
        _node_pod_patch(params, run),
    ]
    if "train" in params.pipeline.timeouts:
        options.append(ActiveDeadlineSeconds(params.pipeline.timeouts["train"]))
    return TrainJobRequest(run.job_name, params.pipeline.training_runtime, trainer, tuple(options))
