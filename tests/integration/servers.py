"""Real servers on loopback for tests: ``moto_server`` (S3) and ``mlflow server``.

Each server is started on 127.0.0.1 on a free port in a session of its own (so that its workers can be
stopped with it), its health endpoint is polled with a deadline, and it is always stopped when the
``with`` block ends: SIGTERM to its process group, then SIGKILL after a grace period. Logs go to files
in the test's tmp folder and are quoted when a server does not come up.

Used by tests/integration and tests/data/test_s3.py (loaded by path: tests are not a package).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
#: dummy credentials: moto accepts any; they must never be real ones
DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def executable(name: str) -> str:
    path = VENV_BIN / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not installed in the venv")
    return str(path)


@dataclass
class Server:
    name: str
    url: str
    process: subprocess.Popen
    log: Path

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "<no log>"


def wait_healthy(server: Server, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last_error: object = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(server.url + path, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError) as error:
            last_error = error
        time.sleep(0.25)
    raise TimeoutError(f"{server.name} not healthy at {server.url}{path} after {timeout:.0f} s "
                       f"({last_error}):\n{server.log_tail()}")


def stop(server: Server, grace: float = 10.0) -> None:
    """SIGTERM to the server's process group, SIGKILL after ``grace`` seconds; reap it."""
    if server.process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.process.pid, signal.SIGTERM)
        try:
            server.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait(timeout=grace)
    # workers that outlived their parent (same group) go too
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(server.process.pid, signal.SIGKILL)


@contextlib.contextmanager
def running(name: str, command: list[str], url: str, health: str, log: Path, env: dict[str, str],
            timeout: float) -> Iterator[Server]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, start_new_session=True)
    server = Server(name, url, process, log)
    try:
        wait_healthy(server, health, timeout)
        yield server
    finally:
        stop(server)


@contextlib.contextmanager
def moto_s3(log_dir: Path, timeout: float = 30.0) -> Iterator[Server]:
    """``moto_server`` on 127.0.0.1:<free port>: an in-memory S3 API."""
    port = free_port()
    env = {**os.environ, **DUMMY_AWS_ENV}
    command = [executable("moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with running("moto_server", command, f"http://127.0.0.1:{port}", "/moto-api/", log_dir / "moto.log", env,
                 timeout) as server:
        yield server


@contextlib.contextmanager
def mlflow_server(log_dir: Path, backend_uri: str, artifacts_destination: str, s3_endpoint: str,
                  timeout: float = 90.0) -> Iterator[Server]:
    """``mlflow server`` on 127.0.0.1:<free port>, artifacts proxied to ``artifacts_destination``."""
    port = free_port()
    env = {**os.environ, **DUMMY_AWS_ENV, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [
        executable("mlflow"), "server", "--backend-store-uri", backend_uri,
        "--artifacts-destination", artifacts_destination, "--serve-artifacts",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    with running("mlflow server", command, f"http://127.0.0.1:{port}", "/health", log_dir / "mlflow.log", env,
                 timeout) as server:
        yield server


def s3_keys(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return keys


def create_bucket(endpoint: str, bucket: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=bucket)


# ----------------------------------------------------------------------------------------- git + DVC

GIT_ENV = {
    "GIT_AUTHOR_NAME": "meddiff tests", "GIT_AUTHOR_EMAIL": "tests@meddiff.invalid",
    "GIT_COMMITTER_NAME": "meddiff tests", "GIT_COMMITTER_EMAIL": "tests@meddiff.invalid",
    "DVC_NO_ANALYTICS": "1",
}


def run(command: list[str], cwd: Path, timeout: float = 120) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **GIT_ENV})
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout


def dvc(*args: str, cwd: Path, timeout: float = 180) -> str:
    return run([executable("dvc"), *args], cwd, timeout)


def init_git_dvc_repo(path: Path) -> Path:
    """A fresh git repository with DVC initialised (no analytics, no autostage)."""
    path.mkdir(parents=True, exist_ok=True)
    run(["git", "init", "-q"], path)
    dvc("init", "-q", cwd=path)
    dvc("config", "core.analytics", "false", cwd=path)
    return path
