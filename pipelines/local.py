"""Run the whole pipeline on this machine with ``kfp.local``; reach the Docker engine.

:func:`run_local` is the logic behind ``meddiff pipeline run``: ``SubprocessRunner`` in the current
interpreter, or ``DockerRunner`` against the built images (the engine is checked first, and an absent
one stops the run at once). :func:`connect_docker` is shared with ``docker/build_images.py``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from meddiff.config import Params
from meddiff.io import read_json

#: Seconds the Docker engine has to answer before a Docker run or image build gives up.
DOCKER_TIMEOUT_S = 5.0

Runner = Literal["subprocess", "docker"]


class DockerUnavailableError(RuntimeError):
    """No Docker engine answered."""




def connect_docker(timeout: float = DOCKER_TIMEOUT_S) -> Any:  # -> docker.DockerClient
    """A Docker SDK client whose engine answered ``ping`` within ``timeout`` seconds, else
    :class:`DockerUnavailableError` naming the endpoint tried (``$DOCKER_HOST`` or the default socket)."""
    import docker

    where = os.environ.get("DOCKER_HOST") or "the default socket (unix:///var/run/docker.sock)"
    try:
        client = docker.from_env(timeout=timeout)
    except docker.errors.DockerException as error:
        raise DockerUnavailableError(f"no Docker engine answers at {where}: {error}") from None
    try:
        client.ping()
    except Exception as error:  # requests/urllib3 errors as well as DockerException
        client.close()
        raise DockerUnavailableError(f"no Docker engine answers at {where}: {error}") from None
    return client


@dataclass(frozen=True)
class LocalRun:
    runner: str
    pipeline_root: str
    run_dir: str
    raw_uri: str
    data_version: str  # the content hash ingest computed ("" when the run has no ingest output)
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_local(
    params: Params,
    runner: Runner = "subprocess",
    pipeline_root: str | Path = "local_outputs",
    raw_uri: str | None = None,
    image: str | None = None,
    gpu_image: str | None = None,
    docker_timeout: float = DOCKER_TIMEOUT_S,
) -> LocalRun:
    """Run the whole pipeline here with ``kfp.local``; outputs under ``pipeline_root/meddiff-<time>/``.

    ``subprocess``: every task in a subprocess of this interpreter (``SubprocessRunner(use_venv=False)``;
    images, resources and Kubernetes settings are ignored). ``docker``: every task in its image
    (``DockerRunner``), which must exist locally or be pullable; the engine is checked first and an
    absent one stops the run at once with :class:`DockerUnavailableError`. ``raw_uri``: the drop to read
    (default ``ingest.raw_uri``; "" runs the built-in cohort).
    """
    from kfp import local
    from meddiff_pipelines.pipeline import build_pipeline

    if runner not in ("subprocess", "docker"):
        raise ValueError(f"runner must be 'subprocess' or 'docker', got {runner!r}")
    root = Path(pipeline_root).resolve()
    if runner == "docker":
        connect_docker(docker_timeout).close()
        root.mkdir(parents=True, exist_ok=True)
        # The images end in ENTRYPOINT ["meddiff"]; KFP passes the whole command, so reset the entrypoint.
        # Run as the caller so that outputs under the bind-mounted root stay the caller's; work in that
        # root so that relative stage paths (a sqlite MLflow store) land there, not in the image.
        backend = local.DockerRunner(entrypoint=[""], user=f"{os.getuid()}:{os.getgid()}", working_dir=str(root))
    else:
        backend = local.SubprocessRunner(use_venv=False)
    raw_uri = params.ingest.raw_uri if raw_uri is None else raw_uri
    local.init(runner=backend, pipeline_root=str(root), raise_on_error=True)
    before = set(root.iterdir()) if root.is_dir() else set()
    started = time.perf_counter()
    # kfp.local logs and streams task output to stdout; keep stdout for the caller's result
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.filterwarnings("ignore", message="You may be attemping to run a task", category=RuntimeWarning)
        warnings.filterwarnings("ignore", message="Task .* have no effect in the current local runner")
        build_pipeline(params, image=image, gpu_image=gpu_image, raw_uri=raw_uri)(raw_uri=raw_uri)
    seconds = time.perf_counter() - started
    new = sorted(path for path in set(root.iterdir()) - before if path.is_dir())
    run_dir = new[-1] if new else root
    return LocalRun(runner, str(root), str(run_dir), raw_uri, run_data_version(run_dir), round(seconds, 1))


def run_data_version(run_dir: Path) -> str:
    """The ``data_version`` output of the run's fetching task (``ingest``, or ``ingest-2`` in the raw-drop
    branch), "" when there is none."""
    from meddiff_pipelines.pipeline import DATA_VERSION_OUTPUT, FETCHING_STAGE

    for output in sorted(Path(run_dir).glob(f"{FETCHING_STAGE}*/executor_output.json")):
        if output.parent.name == FETCHING_STAGE or output.parent.name.startswith(f"{FETCHING_STAGE}-"):
            # the task's result dict repeats its output parameter (kfp.local keeps that one in a file)
            return str(read_json(output)["parameterValues"]["Output"].get(DATA_VERSION_OUTPUT, ""))
    return ""
