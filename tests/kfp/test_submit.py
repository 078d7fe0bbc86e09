"""``meddiff pipeline submit | schedule`` against a stand-in KFP REST API on 127.0.0.1.

The server below answers the KFP v2beta1 endpoints ``kfp.Client`` calls (healthz, experiments, pipelines,
pipeline versions, upload_version, runs, recurringruns) minimally, from in-memory state, and records
every request; the tests then check what was sent: the compiled pipeline spec in the upload, the run
parameters, the cron, ``max_concurrency``, ``no_catchup`` and the experiment. It runs in a thread for
one test at a time, answers each request within a socket timeout and is shut down at the end.
"""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import kfp.client.client
import pytest
import yaml
from meddiff_components.stages import GPU_IMAGE_ENV, IMAGE_ENV
from meddiff_pipelines import client as kfp_client

from meddiff.cli import main
from meddiff.config import Params, apply_overrides, load_params
from meddiff.errors import UserError

REPO = Path(__file__).resolve().parents[2]
PARAMS_FILE = REPO / "params.yaml"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
API = "/apis/v2beta1"


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased
    body: Any = None  # parsed JSON, or {"files": {name: text}} for multipart uploads


@dataclass
class FakeKfp:
    """In-memory KFP v2beta1 state and the requests received."""

    url: str = ""
    requests: list[Request] = field(default_factory=list)
    experiments: dict[str, dict[str, Any]] = field(default_factory=dict)
    pipelines: dict[str, dict[str, Any]] = field(default_factory=dict)
    versions: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    recurring_runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    fail: dict[tuple[str, str], int] = field(default_factory=dict)  # (method, path) -> HTTP status
    ids: Iterator[int] = field(default_factory=itertools.count)

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self.ids)}"

    def calls(self) -> list[tuple[str, str]]:
        return [(r.method, r.path) for r in self.requests]

    def sent(self, method: str, path: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path == path]


def _named(items: dict[str, dict[str, Any]], query: dict[str, str]) -> list[dict[str, Any]]:
    """Items matching a display_name EQUALS filter (the only filter meddiff sends)."""
    if "filter" not in query:
        return list(items.values())
    (predicate,) = json.loads(query["filter"])["predicates"]
    assert predicate["key"] == "display_name" and predicate["operation"] in ("EQUALS", 1)
    wanted = predicate.get("stringValue", predicate.get("string_value"))
    return [item for item in items.values() if item["display_name"] == wanted]


def _multipart_files(content_type: str, body: bytes) -> dict[str, str]:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    return {
        part.get_param("name", header="content-disposition"): part.get_payload(decode=True).decode()
        for part in message.iter_parts()
    }


def _answer(state: FakeKfp, request: Request) -> tuple[int, dict[str, Any]]:
    method, path, query, body = request.method, request.path, request.query, request.body
    if (method, path) in state.fail:
        return state.fail[(method, path)], {"error": "injected failure", "code": 13}
    if (method, path) == ("GET", f"{API}/healthz"):
        return 200, {"multi_user": False}
    if (method, path) == ("GET", f"{API}/experiments"):
        return 200, {"experiments": _named(state.experiments, query)}
    if (method, path) == ("POST", f"{API}/experiments"):
        experiment = {**body, "experiment_id": state.new_id("exp")}
        state.experiments[experiment["experiment_id"]] = experiment
        return 200, experiment
    if (method, path) == ("GET", f"{API}/pipelines"):
        return 200, {"pipelines": _named(state.pipelines, query)}
    if (method, path) == ("POST", f"{API}/pipelines"):
        pipeline = {**body, "pipeline_id": state.new_id("pipeline")}
        state.pipelines[pipeline["pipeline_id"]] = pipeline
        return 200, pipeline
    if (method, path) == ("POST", f"{API}/pipelines/upload_version"):
        if query.get("pipelineid") not in state.pipelines:
            return 404, {"error": f"no pipeline {query.get('pipelineid')}"}
        version = {
            "pipeline_id": query["pipelineid"],
            "pipeline_version_id": state.new_id("version"),
            "display_name": query["name"],
        }
        state.versions[version["pipeline_version_id"]] = version
        return 200, version
    if method == "GET" and path.startswith(f"{API}/pipelines/") and path.endswith("/versions"):
        pipeline_id = path.split("/")[-2]
        mine = {k: v for k, v in state.versions.items() if v["pipeline_id"] == pipeline_id}
        return 200, {"pipeline_versions": _named(mine, query)}
    if (method, path) == ("POST", f"{API}/runs"):
        run = {**body, "run_id": state.new_id("run"), "state": "PENDING"}
        state.runs[run["run_id"]] = run
        return 200, run
    if (method, path) == ("GET", f"{API}/recurringruns"):
        mine = {k: v for k, v in state.recurring_runs.items() if v["experiment_id"] == query.get("experiment_id")}
        return 200, {"recurringRuns": _named(mine, query)}
    if (method, path) == ("POST", f"{API}/recurringruns"):
        recurring_run = {**body, "recurring_run_id": state.new_id("recurring")}
        state.recurring_runs[recurring_run["recurring_run_id"]] = recurring_run
        return 200, recurring_run
    if method == "DELETE" and path.startswith(f"{API}/recurringruns/"):
        return (200, {}) if state.recurring_runs.pop(path.rsplit("/", 1)[1], None) else (404, {"error": "not found"})
    return 404, {"error": f"the fake KFP does not serve {method} {path}"}


def _handler(state: FakeKfp) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = 10  # seconds a connection may stay idle: no request can hang the test

        def _serve(self) -> None:
            url = urlsplit(self.path)
            query = {key: values[-1] for key, values in parse_qs(url.query).items()}
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            content_type = self.headers.get("Content-Type", "")
            if content_type.startswith("multipart/form-data"):
                body: Any = {"files": _multipart_files(content_type, raw)}
            else:
                body = json.loads(raw) if raw else None
            headers = {name.lower(): value for name, value in self.headers.items()}
            request = Request(self.command, url.path, query, headers, body)
            state.requests.append(request)
            status, payload = _answer(state, request)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _serve  # noqa: N815 (http.server's method names)

        def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
            pass

    return Handler


@pytest.fixture
def kfp_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKfp]:
    state = FakeKfp()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    # No context file, proxy, image or endpoint settings of the machine running the tests leak in.
    monkeypatch.setattr(kfp.client.client.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "no-kfp-context.json"))
    for name in ("KFP_HOST", "KFP_TOKEN", "KF_PIPELINES_ENDPOINT", "KF_PIPELINES_UI_ENDPOINT", IMAGE_ENV,
                 GPU_IMAGE_ENV, "MLFLOW_TRACKING_URI", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MEDDIFF_GIT_COMMIT", COMMIT)
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        assert not thread.is_alive(), "the fake KFP server did not stop"


@pytest.fixture
def params() -> Params:
    return load_params(PARAMS_FILE)


def uploaded_spec(state: FakeKfp) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pipeline spec, platform spec) of the one pipeline version uploaded."""
    (upload,) = state.sent("POST", f"{API}/pipelines/upload_version")
    documents = list(yaml.safe_load_all(upload.body["files"]["uploadfile"]))
    assert len(documents) == 2
    return documents[0], documents[1]


# --------------------------------------------------------------------------------------------------
# submit
# --------------------------------------------------------------------------------------------------


def test_submit_creates_experiment_pipeline_version_and_run(kfp_server: FakeKfp, params: Params) -> None:
    result = kfp_client.submit(params, host=kfp_server.url)

    assert kfp_server.calls() == [
        ("GET", f"{API}/healthz"),  # standalone (single-user) detection by kfp.Client
        ("GET", f"{API}/experiments"),
        ("POST", f"{API}/experiments"),
        ("GET", f"{API}/pipelines"),
        ("POST", f"{API}/pipelines"),
        ("GET", f"{API}/pipelines/{result.pipeline_id}/versions"),
        ("POST", f"{API}/pipelines/upload_version"),
        ("POST", f"{API}/runs"),
    ]
    (experiment,) = kfp_server.sent("POST", f"{API}/experiments")
    assert experiment.body["display_name"] == params.pipeline.experiment == "meddiff"
    (pipeline,) = kfp_server.sent("POST", f"{API}/pipelines")
    assert pipeline.body["display_name"] == "meddiff"

    # the version: named after the commit, holding the compiled spec of exactly these params
    (upload,) = kfp_server.sent("POST", f"{API}/pipelines/upload_version")
    assert upload.query["pipelineid"] == result.pipeline_id
    assert upload.query["name"] == result.pipeline_version
    assert result.pipeline_version.startswith(COMMIT[:12] + "-")
    spec, platform = uploaded_spec(kfp_server)
    assert spec["pipelineInfo"]["name"] == "meddiff"
    assert list(spec["root"]["dag"]["tasks"]) == ["condition-branches-1"]  # the fork on raw_uri (test_compile)
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    assert json.loads(defaults["params_json"]["defaultValue"]) == params.to_dict()
    assert defaults["raw_uri"]["defaultValue"] == ""  # the built-in cohort
    assert "train" in str(platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"])

    # the run: that version, in that experiment, with both parameters spelled out
    (run,) = kfp_server.sent("POST", f"{API}/runs")
    assert run.body["experiment_id"] == result.experiment_id
    assert run.body["display_name"] == result.run_name and result.run_name.startswith(f"meddiff-{COMMIT[:8]}-")
    assert run.body["pipeline_version_reference"] == {
        "pipeline_id": result.pipeline_id,
        "pipeline_version_id": result.pipeline_version_id,
    }
    assert "pipeline_spec" not in run.body  # runs reference the uploaded version, not an inline spec
    parameters = run.body["runtime_config"]["parameters"]
    assert json.loads(parameters["params_json"]) == params.to_dict()
    assert parameters["raw_uri"] == ""
    assert run.body["service_account"] == params.pipeline.service_account == "meddiff-pipeline-runner"
    assert result.run_id in kfp_server.runs
    assert "authorization" not in run.headers


def test_submit_again_reuses_pipeline_and_version(kfp_server: FakeKfp, params: Params) -> None:
    first = kfp_client.submit(params, host=kfp_server.url)
    kfp_server.requests.clear()
    second = kfp_client.submit(params, host=kfp_server.url, run_name="again")

    assert ("POST", f"{API}/experiments") not in kfp_server.calls()
    assert ("POST", f"{API}/pipelines") not in kfp_server.calls()
    assert ("POST", f"{API}/pipelines/upload_version") not in kfp_server.calls()
    assert (second.pipeline_id, second.pipeline_version_id) == (first.pipeline_id, first.pipeline_version_id)
    assert second.run_id != first.run_id and kfp_server.runs[second.run_id]["display_name"] == "again"

    # another compile-time setting from the same commit is another version of the same pipeline
    kfp_server.requests.clear()
    third = kfp_client.submit(apply_overrides(params, ["pipeline.cache_training=true"]), host=kfp_server.url)
    assert third.pipeline_id == first.pipeline_id and third.pipeline_version_id != first.pipeline_version_id
    assert third.pipeline_version.startswith(COMMIT[:12]) and third.pipeline_version != first.pipeline_version


def test_cli_submit_with_overrides_token_and_env_host(
    kfp_server: FakeKfp, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KFP_HOST", kfp_server.url)
    monkeypatch.setenv("KFP_TOKEN", "s3cr3t-token")
    argv = [
        "pipeline", "submit", "--params", str(PARAMS_FILE), "--set", "train.epochs=2",
        "--set", 'pipeline.service_account=""', "--experiment", "nightly",
        "--raw-uri", "s3://hospital/exports/2024-06", "--run-name", "manual-1",
    ]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)  # stdout is the JSON result only

    (experiment,) = kfp_server.sent("POST", f"{API}/experiments")
    assert experiment.body["display_name"] == "nightly"
    (run,) = kfp_server.sent("POST", f"{API}/runs")
    assert run.body["display_name"] == "manual-1"
    assert "service_account" not in run.body  # "": the KFP default service account
    assert json.loads(run.body["runtime_config"]["parameters"]["params_json"])["train"]["epochs"] == 2
    assert run.body["runtime_config"]["parameters"]["raw_uri"] == "s3://hospital/exports/2024-06"
    spec, _ = uploaded_spec(kfp_server)
    assert spec["root"]["inputDefinitions"]["parameters"]["raw_uri"]["defaultValue"] == "s3://hospital/exports/2024-06"
    assert {r.headers.get("authorization") for r in kfp_server.requests} == {"Bearer s3cr3t-token"}
    assert list(kfp_server.runs) == [printed["run_id"]]
    assert printed["experiment"] == "nightly" and printed["raw_uri"] == "s3://hospital/exports/2024-06"


def test_submit_in_a_namespace(kfp_server: FakeKfp, params: Params) -> None:
    kfp_client.submit(params, host=kfp_server.url, namespace="team-a")
    assert ("GET", f"{API}/healthz") not in kfp_server.calls()  # a namespace given: no detection needed
    (experiment,) = kfp_server.sent("POST", f"{API}/experiments")
    assert experiment.body["namespace"] == "team-a"
    (lookup,) = kfp_server.sent("GET", f"{API}/pipelines")
    assert lookup.query["namespace"] == "team-a"
    (pipeline,) = kfp_server.sent("POST", f"{API}/pipelines")
    assert pipeline.body["namespace"] == "team-a"


def test_submit_without_host_fails_before_any_request(
    kfp_server: FakeKfp, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["pipeline", "submit", "--params", str(PARAMS_FILE)]) == 1
    assert "pass --host or set KFP_HOST" in capsys.readouterr().err
    assert kfp_server.requests == []


def test_unreachable_endpoint_is_a_clear_error(params: Params, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(kfp.client.client.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "none.json"))
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(kfp_client.KfpError, match=rf"127\.0\.0\.1:{port} is unreachable"):
        kfp_client.submit(params, host=f"http://127.0.0.1:{port}")
    assert time.monotonic() - started < 10


def test_server_error_names_status_and_body(kfp_server: FakeKfp, params: Params) -> None:
    kfp_server.fail[("POST", f"{API}/runs")] = 500
    with pytest.raises(kfp_client.KfpError, match=r"answered 500.*injected failure"):
        kfp_client.submit(params, host=kfp_server.url)


# --------------------------------------------------------------------------------------------------
# schedule
# --------------------------------------------------------------------------------------------------


DROP = "s3://hospital/exports/latest"


def test_schedule_creates_a_weekly_recurring_run(kfp_server: FakeKfp, params: Params) -> None:
    result = kfp_client.schedule(params, host=kfp_server.url, raw_uri=DROP)

    assert kfp_server.calls()[-2:] == [("GET", f"{API}/recurringruns"), ("POST", f"{API}/recurringruns")]
    assert ("POST", f"{API}/runs") not in kfp_server.calls()
    (listed,) = kfp_server.sent("GET", f"{API}/recurringruns")
    assert listed.query["experiment_id"] == result.experiment_id
    (created,) = kfp_server.sent("POST", f"{API}/recurringruns")
    body = created.body
    assert body["display_name"] == "meddiff-retraining"
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * 1"}}
    assert body["trigger"]["cron_schedule"]["cron"] == params.pipeline.schedule_cron
    assert int(body["max_concurrency"]) == 1
    assert body["no_catchup"] is True
    assert body["mode"] == "ENABLE"
    assert body["experiment_id"] == result.experiment_id
    assert kfp_server.experiments[result.experiment_id]["display_name"] == "meddiff"
    assert body["pipeline_version_reference"] == {
        "pipeline_id": result.pipeline_id,
        "pipeline_version_id": result.pipeline_version_id,
    }
    parameters = body["runtime_config"]["parameters"]
    assert json.loads(parameters["params_json"]) == params.to_dict()
    assert parameters["raw_uri"] == DROP
    spec, _ = uploaded_spec(kfp_server)  # the version it runs holds the spec: monitor, then retrain only if needed
    assert spec["pipelineInfo"]["name"] == "meddiff-retrain"
    assert sorted(spec["root"]["dag"]["tasks"]) == ["condition-1", "monitor"]
    assert result.recurring_run_id in kfp_server.recurring_runs
    assert (result.max_concurrency, result.no_catchup, result.replaced) == (1, True, [])


def test_cli_schedule_with_cron_and_experiment(
    kfp_server: FakeKfp, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "pipeline", "schedule", "--params", str(PARAMS_FILE), "--host", kfp_server.url,
        "--cron", "0 30 2 * * SUN", "--experiment", "retraining", "--name", "weekly", "--raw-uri", DROP,
    ]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    (created,) = kfp_server.sent("POST", f"{API}/recurringruns")
    assert created.body["trigger"]["cron_schedule"]["cron"] == "0 30 2 * * SUN"
    assert created.body["display_name"] == "weekly"
    assert kfp_server.experiments[created.body["experiment_id"]]["display_name"] == "retraining"
    assert printed["cron"] == "0 30 2 * * SUN" and list(kfp_server.recurring_runs) == [printed["recurring_run_id"]]


@pytest.mark.parametrize("cron", ["0 3 * * 1", "0 0 3 * * 1 2030", "0 61 3 * * 1", "weekly"])
def test_schedule_rejects_a_bad_cron_before_any_request(
    kfp_server: FakeKfp, cron: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["pipeline", "schedule", "--params", str(PARAMS_FILE), "--host", kfp_server.url, "--cron", cron]
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert "cron" in error and repr(cron) in error
    assert kfp_server.requests == []


def test_schedule_without_a_drop_fails_before_any_request(kfp_server: FakeKfp, params: Params) -> None:
    with pytest.raises(UserError, match=r"recurring run retrains on your data: give --raw-uri"):
        kfp_client.schedule(params, host=kfp_server.url)
    assert kfp_server.requests == []


def test_schedule_refuses_a_second_schedule_unless_replace(kfp_server: FakeKfp, params: Params) -> None:
    first = kfp_client.schedule(params, host=kfp_server.url, raw_uri=DROP)
    with pytest.raises(kfp_client.KfpError, match=r"already exists.*--replace"):
        kfp_client.schedule(params, host=kfp_server.url, raw_uri=DROP)
    assert len(kfp_server.recurring_runs) == 1

    kfp_server.requests.clear()
    second = kfp_client.schedule(params, host=kfp_server.url, replace=True, raw_uri=DROP)
    assert kfp_server.calls()[-3:] == [
        ("GET", f"{API}/recurringruns"),
        ("DELETE", f"{API}/recurringruns/{first.recurring_run_id}"),
        ("POST", f"{API}/recurringruns"),
    ]
    assert second.replaced == [first.recurring_run_id]
    assert list(kfp_server.recurring_runs) == [second.recurring_run_id]


# --------------------------------------------------------------------------------------------------
# cron validation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cron",
    ["0 0 3 * * 1", "0 */15 * * * *", "0 0 3 ? * MON-FRI", "30 30 2 1 JAN,JUL *", "0 0 0 1-7 * 0", "0 0 */6 * * ?"],
)
def test_valid_crons(cron: str) -> None:
    assert kfp_client.validate_cron(cron) == cron


@pytest.mark.parametrize(
    ("cron", "message"),
    [
        ("0 3 * * 1", r"5 field\(s\).*6.*prepend the seconds"),
        ("0 0 3 * * 1 2030", r"7 field\(s\)"),
        ("", r"0 field\(s\)"),
        ("0 60 * * * *", r"minutes 60 is outside 0-59"),
        ("0 0 24 * * *", r"hours 24 is outside 0-23"),
        ("0 0 0 0 * *", r"day-of-month 0 is outside 1-31"),
        ("0 0 0 * 13 *", r"month 13 is outside 1-12"),
        ("0 0 0 * * 7", r"day-of-week 7 is outside 0-6"),
        ("0 */0 * * * *", r"step of 0"),
        ("? * * * * *", r"'\?' is only allowed"),
        ("0 0 3 * * FUNDAY", r"'FUNDAY' is not a number"),
        ("0 0 3 * * 1;rm", r"not a cron expression"),
    ],
)
def test_invalid_crons(cron: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        kfp_client.validate_cron(cron)


def test_params_cron_must_have_six_fields(params: Params) -> None:
    with pytest.raises(ValueError, match=r"pipeline\.schedule_cron.*6-field"):
        apply_overrides(params, ["pipeline.schedule_cron=0 3 * * 1"])
