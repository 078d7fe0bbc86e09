"""The train task with more than one GPU: stage the data, submit the TrainJob, stream its logs, fail with it.

:func:`run_train` is the body of the ``train`` component. With one GPU (``train.nodes × train.gpus_per_node
== 1``) it is :func:`meddiff.stages.run_component`, training in the task's own pod. With more it:

1. hashes the processed data and derives the training run key (:func:`meddiff.training.train.run_key`),
   which names the TrainJob (``meddiff-train-<key>``) and its folder on the shared volume;
2. copies the input artifact to the shared volume and writes the params there, ``paths.checkpoints``
   pointing at the volume (:class:`~meddiff_components.trainjob.SharedRun`);
3. submits the TrainJob built by :func:`~meddiff_components.trainjob.build_trainjob` with the Kubeflow SDK's
   ``TrainerClient`` (:func:`submit`); a job of the same name still running (a restarted task) is followed
   instead of submitted twice, a finished one is replaced (its checkpoints, if any, are resumed);
4. streams the logs of rank 0's node until it ends, then waits for the job's final status
   (:func:`follow`); a failed job raises :class:`TrainJobFailedError` with the job's failure condition, its
   recent events and the tail of the failed nodes' logs, which fails the KFP task;
5. copies the model rank 0 wrote to the task's ``model`` artifact and returns its ``run.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import yaml
from kubeflow.common.types import KubernetesBackendConfig
from kubeflow.trainer import TrainerClient
from kubeflow.trainer.constants import constants as trainer_constants
from kubeflow.trainer.types.types import Event, TrainJob
from meddiff_components.trainjob import (
    FORWARDED_ENV,
    TRAINER_NODE,
    TRAINJOB_IMAGE_ENV,
    SharedRun,
    TrainJobRequest,
    build_trainjob,
    is_distributed,
    trainjob_name,
    world_size,
)

from meddiff.config import Params, params_from_dict
from meddiff.io import atomic_dir, atomic_file
from meddiff.stages import DATA_VERSION_ENV, run_component

CREATED, RUNNING = trainer_constants.TRAINJOB_CREATED, trainer_constants.TRAINJOB_RUNNING
COMPLETE, FAILED = trainer_constants.TRAINJOB_COMPLETE, trainer_constants.TRAINJOB_FAILED
#: Step of rank 0's node, whose logs the task streams (``node-0``).
RANK0_STEP = f"{TRAINER_NODE}-0"
#: Seconds between two status polls of the TrainJob.
POLL_SECONDS = 10
#: Wait for the job when ``pipeline.timeouts`` sets no deadline for train (the SDK needs a bound): 7 days.
UNBOUNDED_WAIT_SECONDS = 7 * 24 * 3600
#: Lines of each failed node's log, and recent events, quoted when the job fails.
LOG_TAIL_LINES = 40
EVENT_LINES = 10
RUN_FILE = "run.json"


class TrainJobFailedError(RuntimeError):
    """The TrainJob ended ``Failed``; the message holds its failure condition, events and log tails."""


class TrainJobs(Protocol):
    """What the train task uses of the Kubeflow SDK's ``TrainerClient`` (a fake in tests)."""

    def train(self, runtime: str | None = None, initializer: None = None, trainer: Any = None,
              options: list | None = None) -> str: ...

    def list_jobs(self, runtime: Any = None) -> list[TrainJob]: ...

    def delete_job(self, name: str) -> None: ...

    def wait_for_job_status(self, name: str, status: set[str], timeout: int, polling_interval: int,
                            callbacks: Any = None) -> TrainJob: ...

    def get_job_logs(self, name: str, step: str = RANK0_STEP, follow: bool | None = False) -> Iterator[str]: ...

    def get_job_events(self, name: str) -> list[Event]: ...

    def failure_condition(self, name: str) -> str: ...


class MeddiffTrainerClient(TrainerClient):
    """``TrainerClient`` (Kubernetes backend) plus the one thing its ``TrainJob`` type leaves out: the
    ``Failed`` condition's reason and message (``status.conditions`` of the TrainJob resource)."""

    def failure_condition(self, name: str) -> str:
        backend = self.backend
        resource = backend.custom_api.get_namespaced_custom_object(
            trainer_constants.GROUP, trainer_constants.VERSION, backend.namespace,
            trainer_constants.TRAINJOB_PLURAL, name,
        )
        return failed_condition_message(resource)


def failed_condition_message(resource: dict[str, Any]) -> str:
    """``<reason>: <message>`` of a TrainJob resource's ``Failed`` condition, or "" when it has none."""
    for condition in resource.get("status", {}).get("conditions", []):
        if condition.get("type") == FAILED and condition.get("status") == "True":
            return f"{condition.get('reason', '')}: {condition.get('message', '')}".strip(": ")
    return ""


def submit(client: TrainJobs, request: TrainJobRequest, log: Callable[[str], None] = print) -> str:
    """Submit the TrainJob, unless one of the same name is still active (then follow that one).

    A finished job of the same name (an earlier attempt of the same run) is deleted first: the new job
    resumes from the run's checkpoints on the shared volume where that attempt left any.

    Returns:
        The TrainJob's name.
    """
    existing = {job.name: job for job in client.list_jobs()}
    job = existing.get(request.name)
    if job is not None and job.status in {CREATED, RUNNING}:
        log(f"TrainJob {request.name} is already {job.status}: following it instead of submitting another")
        return request.name
    if job is not None:
        log(f"TrainJob {request.name} ended {job.status} earlier: deleting it and submitting again")
        client.delete_job(request.name)
    name = client.train(runtime=request.runtime, trainer=request.trainer, options=list(request.options))
    log(f"submitted TrainJob {name} (runtime {request.runtime}, {request.trainer.num_nodes} node(s))")
    return name


def _tail(lines: Iterable[str], count: int) -> list[str]:
    return list(lines)[-count:]


def describe_failure(client: TrainJobs, job: TrainJob) -> str:
    """Why ``job`` failed: its ``Failed`` condition, its recent events and the tail of each failed node's log
    (rank 0's when no node failed on its own, e.g. a deadline)."""
    parts = [f"TrainJob {job.name} failed"]
    condition = client.failure_condition(job.name)
    if condition:
        parts[0] += f": {condition}"
    try:
        events = client.get_job_events(job.name)[-EVENT_LINES:]
    except (RuntimeError, TimeoutError) as error:
        parts.append(f"events: not available ({error})")
    else:
        if events:
            parts.append("events:\n" + "\n".join(
                f"  {e.involved_object_kind}/{e.involved_object_name} {e.reason}: {e.message}" for e in events
            ))
    failed_steps = [step.name for step in job.steps if step.status == FAILED] or [RANK0_STEP]
    for step in failed_steps:
        try:
            tail = _tail(client.get_job_logs(job.name, step=step), LOG_TAIL_LINES)
        except (RuntimeError, TimeoutError) as error:
            parts.append(f"log of {step}: not available ({error})")
            continue
        parts.append(f"last {len(tail)} log lines of {step}:\n" + "\n".join(f"  {line}" for line in tail))
    return "\n".join(parts)


def follow(
    client: TrainJobs, name: str, timeout_s: int, log: Callable[[str], None] = print, poll_s: int = POLL_SECONDS,
    clock: Callable[[], float] = time.monotonic,
) -> TrainJob:
    """Wait until the TrainJob runs, stream rank 0's log, wait for its end; return it when ``Complete``.

    Raises:
        TrainJobFailedError: the job ended ``Failed`` (message: :func:`describe_failure`).
        TimeoutError: neither end within ``timeout_s`` seconds.
    """
    deadline = clock() + timeout_s

    def remaining() -> int:
        left = int(deadline - clock())
        if left <= poll_s:
            raise TimeoutError(f"TrainJob {name} did not finish within {timeout_s} s")
        return left

    client.wait_for_job_status(name, {RUNNING, COMPLETE, FAILED}, timeout=remaining(), polling_interval=poll_s)
    try:
        for line in client.get_job_logs(name, step=RANK0_STEP, follow=True):
            log(line.rstrip("\n"))
    except RuntimeError as error:  # the pod went away (restart, eviction): the job's status decides
        log(f"log stream of TrainJob {name} ended early: {error}")
    job = client.wait_for_job_status(name, {COMPLETE, FAILED}, timeout=remaining(), polling_interval=poll_s)
    if job.status == FAILED:
        raise TrainJobFailedError(describe_failure(client, job))
    log(f"TrainJob {name} is {job.status}")
    return job


def stage_inputs(params: Params, processed_dir: Path, run: SharedRun) -> Params:
    """Copy the processed data and write the params of ``run`` onto the shared volume.

    The data is copied once per run (the folder is named by the run key, which hashes the data, and is
    written atomically); the params file is rewritten every time.

    Returns:
        The params the nodes train with: ``paths.checkpoints`` on the shared volume.
    """
    processed = Path(run.processed)
    if not processed.is_dir():
        with atomic_dir(processed) as staging:
            shutil.copytree(processed_dir, staging, dirs_exist_ok=True)
    raw = params.to_dict()
    raw["paths"]["checkpoints"] = str(run.checkpoints)
    job_params = params_from_dict(raw, source="TrainJob params")
    with atomic_file(Path(run.params_file)) as handle:
        yaml.safe_dump(job_params.to_dict(), handle, sort_keys=False)
    return job_params


def train_as_trainjob(
    params: Params, image: str, processed_dir: Path, model_dir: Path, client: TrainJobs,
    log: Callable[[str], None] = print, poll_s: int = POLL_SECONDS,
) -> dict[str, Any]:
    """Train on ``processed_dir`` as a TrainJob and write the model into ``model_dir``.

    Returns:
        The trained model's ``run.json`` (the train stage's result).

    Raises:
        TrainJobFailedError, TimeoutError: see :func:`follow`.
        FileNotFoundError: the job completed without a model on the shared volume.
    """
    from meddiff.training.train import data_digest, run_key

    key = run_key(params, data_digest(processed_dir))
    run = SharedRun.for_params(params, trainjob_name(key))
    job_params = stage_inputs(params, processed_dir, run)
    env = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    request = build_trainjob(job_params, image, run, key, env)
    log(f"training on {world_size(params.train)} GPUs ({params.train.nodes} node(s)); run folder {run.root}")
    name = submit(client, request, log)
    follow(client, name, params.pipeline.timeouts.get("train", UNBOUNDED_WAIT_SECONDS), log, poll_s)
    trained = Path(run.model)
    if not (trained / RUN_FILE).is_file():
        raise FileNotFoundError(f"{trained / RUN_FILE}: TrainJob {name} completed but rank 0 wrote no model")
    with atomic_dir(model_dir) as staging:
        shutil.copytree(trained, staging, dirs_exist_ok=True)
    return json.loads((Path(model_dir) / RUN_FILE).read_text())


class _PathArtifact(Protocol):
    path: str


def run_train(
    params_json: str, data_version: str = "", client: TrainJobs | None = None, **artifacts: _PathArtifact
) -> dict[str, Any]:
    """The body of the ``train`` component: one GPU in the task's pod, more as a TrainJob.

    Args:
        params_json: the validated params as JSON (the pipeline parameter).
        data_version: exported as ``$MEDDIFF_DATA_VERSION`` and returned with the result.
        client: the Trainer client; default a :class:`MeddiffTrainerClient` in the pod's namespace
            (``pipeline.namespace`` when set).
        artifacts: ``processed`` (input) and ``model`` (output), as for :func:`meddiff.stages.run_component`.

    Raises:
        ValueError: the pipeline was compiled for the other case (the task's pod has, or lacks, the
            TrainJob image and the shared volume), since ``train.nodes``/``gpus_per_node`` shape the pod
            when the pipeline is compiled.
    """
    params = params_from_dict(json.loads(params_json), source="params_json")
    image = os.environ.get(TRAINJOB_IMAGE_ENV, "")
    if not is_distributed(params.train):
        if image:
            raise ValueError(
                "params_json asks for one GPU but the pipeline was compiled for a TrainJob (its train task has "
                "no GPU): compile it with the same train.nodes and train.gpus_per_node as the run"
            )
        return run_component("train", params_json, data_version, **artifacts)
    if not image:
        raise ValueError(
            f"params_json asks for {world_size(params.train)} GPUs but the pipeline was compiled for one "
            f"(${TRAINJOB_IMAGE_ENV} is not set): compile it with the same train.nodes and train.gpus_per_node"
        )
    if set(artifacts) != {"processed", "model"}:
        raise TypeError(f"the train component takes artifacts ['model', 'processed'], not {sorted(artifacts)}")
    if data_version:
        os.environ[DATA_VERSION_ENV] = data_version
    if client is None:
        namespace = params.pipeline.namespace or None
        client = MeddiffTrainerClient(KubernetesBackendConfig(namespace=namespace))
    result = train_as_trainjob(
        params, image, Path(artifacts["processed"].path), Path(artifacts["model"].path), client
    )
    return {**result, "data_version": data_version}
