"""The pinned MLflow really runs the basic-auth app the way ``infra/base/mlflow`` configures it.

The INI is written by the init container's own script (``infra/base/mlflow/auth_config.py``, run as the
Deployment runs it) with a sqlite user store in a temporary folder; ``mlflow server --app-name basic-auth``
starts on a free loopback port with the admin user and CSRF key from the environment, as the Secret
``mlflow-auth`` provides them. Then, through MLflow's own client and the environment variables the pipeline's
tasks get from ``meddiff-credentials`` (``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``):
no credentials → 401, a wrong password → 401, the admin → allowed; a pipeline user the admin created may
create its own experiment but not read the admin's (``NO_PERMISSIONS`` by default).

Every authenticated request costs one PBKDF2 password check (about a second of CPU), so the test makes few.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from meddiff_components.trainjob import CREDENTIAL_KEYS

REPO = Path(__file__).resolve().parents[2]
AUTH_SCRIPT = REPO / "infra" / "base" / "mlflow" / "auth_config.py"
ADMIN, ADMIN_PASSWORD = "test-admin", "test-admin-password-4f1c"
PIPELINE_USER, PIPELINE_PASSWORD = "test-pipeline", "test-pipeline-password-9a2e"
#: The server imports MLflow and migrates two sqlite stores on start: seconds, more on a loaded machine.
START_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 30.0
SHUTDOWN_TIMEOUT_S = 10.0
POLL_S = 0.25
HTTP_UNAUTHORIZED, HTTP_OK = 401, 200

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _status(url: str, user: str | None = None, password: str | None = None) -> int:
    request = urllib.request.Request(url)
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip(
        "flask_wtf",
        reason="Flask-WTF (the mlflow[auth] extra that --app-name basic-auth imports) is not installed in the venv",
    )
    folder = tmp_path_factory.mktemp("mlflow-auth")
    ini = folder / "etc" / "basic_auth.ini"
    env = {
        **os.environ,
        "MLFLOW_AUTH_DATABASE_URI": f"sqlite:///{folder / 'auth.db'}",
        "MLFLOW_AUTH_DEFAULT_PERMISSION": "NO_PERMISSIONS",
    }
    written = subprocess.run([sys.executable, str(AUTH_SCRIPT), str(ini)], env=env, capture_output=True, text=True,
                             timeout=60)
    assert written.returncode == 0, written.stderr
    assert ini.stat().st_mode & 0o777 == 0o600
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server_env = {
        **{k: v for k, v in os.environ.items() if k not in CREDENTIAL_KEYS and k != "MLFLOW_TRACKING_URI"},
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN,
        "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-csrf-key",
        # the GenAI job runner (huey consumers) is no part of auth; off, it saves ~20 s of start and shutdown
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    command = [
        str(Path(sys.executable).parent / "mlflow"), "server", "--app-name", "basic-auth",
        "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--default-artifact-root", str(folder / "art"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    log = (folder / "server.log").open("w")
    server = subprocess.Popen(command, env=server_env, cwd=folder, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"mlflow server exited {server.returncode}:\n{(folder / 'server.log').read_text()}")
            try:
                if _status(f"{url}/health") == HTTP_OK:
                    break
            except OSError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not up in {START_TIMEOUT_S} s:\n{(folder / 'server.log').read_text()}")
            time.sleep(POLL_S)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn worker, a session of their own
        try:
            server.wait(timeout=SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=SHUTDOWN_TIMEOUT_S)
        log.close()


def test_unauthenticated_and_wrong_password_are_rejected(auth_server: str) -> None:
    search = f"{auth_server}/api/2.0/mlflow/experiments/search?max_results=1"
    assert _status(search) == HTTP_UNAUTHORIZED
    assert _status(search, ADMIN, "not-the-password") == HTTP_UNAUTHORIZED
    assert _status(search, ADMIN, ADMIN_PASSWORD) == HTTP_OK
    assert _status(f"{auth_server}/health") == HTTP_OK  # the probes of the Deployment need no user


def test_pipeline_user_through_the_tracking_credentials(auth_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    AuthServiceClient(auth_server).create_user(PIPELINE_USER, PIPELINE_PASSWORD)
    admins_experiment = MlflowClient(auth_server).create_experiment("admin-only")

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", PIPELINE_USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PIPELINE_PASSWORD)
    client = MlflowClient(auth_server)
    own = client.create_experiment("meddiff")  # a write: its creator may use it (MANAGE on what it creates)
    with pytest.raises(MlflowException) as denied:
        client.get_experiment(admins_experiment)
    assert denied.value.error_code == "PERMISSION_DENIED"

    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    with pytest.raises(MlflowException) as anonymous:
        MlflowClient(auth_server).get_experiment(own)
    assert "401" in str(anonymous.value) or anonymous.value.error_code == "UNAUTHENTICATED"
