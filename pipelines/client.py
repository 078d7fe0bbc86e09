"""Kubeflow Pipelines from the workstation: submit a run, schedule retraining.

The logic behind ``meddiff pipeline submit | schedule`` (the CLI only parses flags; local runs are
:mod:`meddiff_pipelines.local`):

* :func:`submit` compiles the pipeline, makes sure the KFP pipeline ``meddiff`` exists, uploads a
  pipeline *version* named after the git commit, files a run under the experiment and returns ids;
* :func:`schedule` does the same but creates a *recurring run*: a 6-field cron, ``max_concurrency=1``,
  no catch-up, so that missed slots never pile up into a burst of GPU jobs;

Every run carries two pipeline parameters: ``params_json`` (the validated params) and ``raw_uri`` (the
raw drop to read, "" for the built-in cohort; default ``ingest.raw_uri``). The pipeline version is named
after the commit; the data version is the content hash ingest computes from the drop it reads, recorded
on every MLflow run. Heavy imports (``kfp``) happen inside the functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from meddiff.config import Params
from meddiff.tracking import git_commit

HOST_ENV = "KFP_HOST"
TOKEN_ENV = "KFP_TOKEN"


class KfpError(RuntimeError):
    """A KFP endpoint that is missing, unreachable or refuses a request; the message says which."""


# --------------------------------------------------------------------------------------------------
# Cron
# --------------------------------------------------------------------------------------------------

#: (name, lowest, highest) of each field of the 6-field cron KFP's scheduler reads (robfig/cron).
_CRON_FIELDS: tuple[tuple[str, int, int], ...] = (
    ("seconds", 0, 59),
    ("minutes", 0, 59),
    ("hours", 0, 23),
    ("day-of-month", 1, 31),
    ("month", 1, 12),
    ("day-of-week", 0, 6),
)
_CRON_NAMES = {
    "month": ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"),
    "day-of-week": ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"),
}
_CRON_ITEM = re.compile(r"^(\*|\?|[0-9A-Za-z]+(-[0-9A-Za-z]+)?)(/[0-9]+)?$")


def validate_cron(expression: str) -> str:
    """``expression`` if it is a valid 6-field cron (``s m h dom mon dow``); else :class:`ValueError`
    saying what is wrong. KFP recurring runs use robfig/cron with a leading *seconds* field, so the
    usual 5-field crontab line is rejected rather than silently shifted by one field."""
    fields = expression.split()
    if len(fields) != 6:
        hint = " (a 5-field crontab line? prepend the seconds: '0 ' + it)" if len(fields) == 5 else ""
        raise ValueError(
            f"cron {expression!r} has {len(fields)} field(s); KFP needs 6: seconds minutes hours "
            f"day-of-month month day-of-week, e.g. '0 0 3 * * 1' (Mondays 03:00:00){hint}"
        )
    for value, (name, low, high) in zip(fields, _CRON_FIELDS, strict=True):
        for item in value.split(","):
            match = _CRON_ITEM.match(item)
            if not match:
                raise ValueError(f"cron {expression!r}: {name} field {value!r} is not a cron expression")
            if match.group(3) and int(match.group(3)[1:]) == 0:
                raise ValueError(f"cron {expression!r}: {name} field {value!r} has a step of 0")
            if item.startswith(("*", "?")):
                if item.startswith("?") and name not in {"day-of-month", "day-of-week"}:
                    raise ValueError(f"cron {expression!r}: '?' is only allowed in day-of-month or day-of-week")
                continue
            for bound in match.group(1).split("-"):
                if bound.isdigit():
                    number = int(bound)
                elif bound.upper() in _CRON_NAMES.get(name, ()):
                    continue
                else:
                    raise ValueError(f"cron {expression!r}: {name} field {value!r}: {bound!r} is not a number")
                if not low <= number <= high:
                    raise ValueError(f"cron {expression!r}: {name} {number} is outside {low}-{high}")
    return expression


# --------------------------------------------------------------------------------------------------
# KFP endpoint
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """Where and as whom to talk to KFP."""

    host: str
    #: multi-user KFP profile namespace; "" for a standalone install
    namespace: str = ""
    #: bearer token (``$KFP_TOKEN``); None leaves auth to kfp.Client's own mechanisms
    token: str | None = None

    @classmethod
    def resolve(cls, host: str | None, namespace: str | None, params: Params) -> Endpoint:
        """``host`` or ``$KFP_HOST``; ``namespace`` or ``pipeline.namespace``; token from ``$KFP_TOKEN``."""
        resolved = host or os.environ.get(HOST_ENV)
        if not resolved:
            raise KfpError(
                f"no KFP endpoint: pass --host or set {HOST_ENV} (e.g. http://localhost:8080 after "
                "`kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80`)"
            )
        return cls(
            host=resolved.rstrip("/"),
            namespace=params.pipeline.namespace if namespace is None else namespace,
            token=os.environ.get(TOKEN_ENV) or None,
        )


@contextlib.contextmanager
def _kfp_calls(endpoint: Endpoint) -> Iterator[None]:
    """Turn kfp/kfp_server_api/urllib3 failures into :class:`KfpError`; keep kfp's own ``print`` of
    links off stdout (the CLI prints its JSON result there) and its client warning quiet."""
    import kfp_server_api
    import urllib3

    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.filterwarnings("ignore", message="This client only works with Kubeflow", category=FutureWarning)
        try:
            yield
        except kfp_server_api.ApiException as error:
            body = (error.body or "").strip()
            raise KfpError(f"KFP at {endpoint.host} answered {error.status} {error.reason}: {body[:500]}") from None
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise KfpError(f"KFP at {endpoint.host} is unreachable: {error}") from None


def make_client(endpoint: Endpoint) -> Any:  # -> kfp.Client
    """A ``kfp.Client`` for ``endpoint``. With ``$KFP_TOKEN`` the token is sent as a bearer token;
    without it kfp.Client's own mechanisms apply (``~/.config/kfp/context.json`` cookies/headers,
    ``KF_PIPELINES_*`` OAuth settings)."""
    import kfp

    return kfp.Client(host=endpoint.host, namespace=endpoint.namespace or "kubeflow", existing_token=endpoint.token)


def _display_name_filter(name: str) -> str:
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})


def version_name(commit: str, package: Path) -> str:
    """The pipeline version's name: the git commit, plus a digest of the compiled spec so that two
    submits from one commit with different compile-time settings do not clash (KFP version names are
    unique per pipeline) and an identical resubmit reuses its version."""
    digest = hashlib.sha256(package.read_bytes()).hexdigest()[:8]
    return f"{commit[:12]}-{digest}"


@dataclass(frozen=True)
class Upload:
    pipeline_id: str
    pipeline_version_id: str
    pipeline_version: str
    created_pipeline: bool
    created_version: bool


def ensure_pipeline_version(
    client: Any, package: Path, pipeline_name: str, version: str, namespace: str = "", description: str = ""
) -> Upload:
    """The KFP pipeline ``pipeline_name`` (created if missing) and its version ``version`` (uploaded from
    ``package`` if missing)."""
    import kfp_server_api

    found = client.list_pipelines(filter=_display_name_filter(pipeline_name), namespace=namespace or None)
    pipelines = [p for p in (found.pipelines or []) if p.display_name == pipeline_name]
    if len(pipelines) > 1:
        raise KfpError(f"{len(pipelines)} KFP pipelines are named {pipeline_name!r}; names must be unique")
    created_pipeline = not pipelines
    if pipelines:
        pipeline_id = pipelines[0].pipeline_id
    else:
        pipeline = kfp_server_api.V2beta1Pipeline(
            display_name=pipeline_name, description=description or None, namespace=namespace or None
        )
        pipeline_id = client.pipelines.pipeline_service_create_pipeline(pipeline=pipeline).pipeline_id

    versions = client.list_pipeline_versions(pipeline_id=pipeline_id, filter=_display_name_filter(version))
    matching = [v for v in (versions.pipeline_versions or []) if v.display_name == version]
    if matching:
        return Upload(pipeline_id, matching[0].pipeline_version_id, version, created_pipeline, False)
    uploaded = client.upload_pipeline_version(
        pipeline_package_path=str(package),
        pipeline_version_name=version,
        pipeline_id=pipeline_id,
        description=description or None,
    )
    return Upload(pipeline_id, uploaded.pipeline_version_id, version, created_pipeline, True)


@dataclass(frozen=True)
class Prepared:
    """A compiled pipeline uploaded as a version, and the experiment to file runs under."""

    endpoint: Endpoint
    client: Any
    upload: Upload
    experiment_id: str
    experiment: str
    commit: str
    parameters: dict[str, str]

    def filed(self) -> dict[str, str]:
        """The :class:`Filed` fields of a run filed from this preparation."""
        return {
            "host": self.endpoint.host, "experiment": self.experiment, "experiment_id": self.experiment_id,
            "pipeline_id": self.upload.pipeline_id, "pipeline_version": self.upload.pipeline_version,
            "pipeline_version_id": self.upload.pipeline_version_id,
            "raw_uri": self.parameters["raw_uri"], "commit": self.commit,
        }


def _prepare(
    params: Params,
    endpoint: Endpoint,
    experiment: str | None,
    raw_uri: str | None,
    image: str | None,
    gpu_image: str | None,
    retrain: bool = False,
) -> Prepared:
    """Compile (``retrain``: the ``meddiff-retrain`` pipeline, else ``meddiff``), upload, find the experiment."""
    from meddiff_pipelines import pipeline as main_pipeline
    from meddiff_pipelines import retrain as retrain_pipeline

    commit = git_commit()
    raw_uri = params.ingest.raw_uri if raw_uri is None else raw_uri
    experiment = experiment or params.pipeline.experiment
    if retrain:
        name, description = retrain_pipeline.RETRAIN_PIPELINE, retrain_pipeline.PIPELINE_DESCRIPTION
        compile_spec = retrain_pipeline.compile_retrain_pipeline
    else:
        name, description = main_pipeline.PIPELINE_NAME, main_pipeline.PIPELINE_DESCRIPTION
        compile_spec = main_pipeline.compile_pipeline
    with tempfile.TemporaryDirectory(prefix="meddiff-submit-") as staging:
        package = compile_spec(params, Path(staging) / "pipeline.yaml", image=image, gpu_image=gpu_image,
                               raw_uri=raw_uri)
        with _kfp_calls(endpoint):
            client = make_client(endpoint)
            found = client.create_experiment(name=experiment, namespace=endpoint.namespace or None)
            upload = ensure_pipeline_version(
                client,
                package,
                name,
                version_name(commit, package),
                namespace=endpoint.namespace,
                description=f"{description} Commit {commit}.",
            )
    parameters = {"params_json": main_pipeline.params_to_json(params), "raw_uri": raw_uri}
    return Prepared(endpoint, client, upload, found.experiment_id, experiment, commit, parameters)


@dataclass(frozen=True)
class Filed:
    """Where a run or a recurring run was filed: endpoint, experiment, pipeline version, data and code."""

    host: str
    experiment: str
    experiment_id: str
    pipeline_id: str
    pipeline_version: str
    pipeline_version_id: str
    raw_uri: str
    commit: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Submitted(Filed):
    run_id: str
    run_name: str


def submit(
    params: Params,
    host: str | None = None,
    namespace: str | None = None,
    experiment: str | None = None,
    run_name: str | None = None,
    raw_uri: str | None = None,
    image: str | None = None,
    gpu_image: str | None = None,
) -> Submitted:
    """Upload the pipeline compiled from ``params`` as a version named after the git commit and start
    one run of it with ``params_json`` and ``raw_uri``.

    Requests (KFP v2beta1 REST): ``GET /healthz`` (standalone installs), ``GET|POST /experiments``,
    ``GET|POST /pipelines``, ``GET /pipelines/{id}/versions``, ``POST /pipelines/upload_version``,
    ``POST /runs``.
    """
    endpoint = Endpoint.resolve(host, namespace, params)
    prepared = _prepare(params, endpoint, experiment, raw_uri, image, gpu_image)
    name = run_name or f"meddiff-{prepared.commit[:8]}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    with _kfp_calls(endpoint):
        run = prepared.client.run_pipeline(
            experiment_id=prepared.experiment_id,
            job_name=name,
            params=prepared.parameters,
            pipeline_id=prepared.upload.pipeline_id,
            version_id=prepared.upload.pipeline_version_id,
            service_account=params.pipeline.service_account or None,
        )
    return Submitted(**prepared.filed(), run_id=run.run_id, run_name=name)


@dataclass(frozen=True)
class Scheduled(Filed):
    recurring_run_id: str
    name: str
    cron: str
    max_concurrency: int
    no_catchup: bool
    replaced: list[str]


def schedule(
    params: Params,
    host: str | None = None,
    namespace: str | None = None,
    experiment: str | None = None,
    name: str = "meddiff-retraining",
    cron: str | None = None,
    replace: bool = False,
    raw_uri: str | None = None,
    image: str | None = None,
    gpu_image: str | None = None,
) -> Scheduled:
    """A recurring run of the ``meddiff-retrain`` pipeline version for this commit on the drop ``raw_uri``
    (default ``ingest.raw_uri``; required): each run monitors the drop and retrains only when it drifted or
    brought enough new labels (:mod:`meddiff_pipelines.retrain`). ``cron`` (default
    ``pipeline.schedule_cron``, 6 fields), one run at a time, no catch-up of missed slots.

    A recurring run of the same ``name`` in the experiment is an error (two schedules would train
    twice); with ``replace`` it is deleted first. Requests: those of :func:`submit` up to the upload,
    then ``GET /recurringruns``, ``DELETE /recurringruns/{id}`` (``replace``), ``POST /recurringruns``.
    """
    cron = validate_cron(cron or params.pipeline.schedule_cron)
    endpoint = Endpoint.resolve(host, namespace, params)
    prepared = _prepare(params, endpoint, experiment, raw_uri, image, gpu_image, retrain=True)
    client = prepared.client
    with _kfp_calls(endpoint):
        listed = client.list_recurring_runs(
            experiment_id=prepared.experiment_id,
            filter=_display_name_filter(name),
            page_size=100,
        )
        existing = [r.recurring_run_id for r in (listed.recurring_runs or []) if r.display_name == name]
        if existing and not replace:
            raise KfpError(
                f"recurring run {name!r} already exists in experiment {prepared.experiment!r} "
                f"(id {', '.join(existing)}); pass --replace to swap it for this version, or choose another --name"
            )
        for recurring_run_id in existing:
            client.delete_recurring_run(recurring_run_id)
        created = client.create_recurring_run(
            experiment_id=prepared.experiment_id,
            job_name=name,
            description=f"Scheduled retraining, commit {prepared.commit}",
            cron_expression=cron,
            max_concurrency=1,
            no_catchup=True,
            params=prepared.parameters,
            pipeline_id=prepared.upload.pipeline_id,
            version_id=prepared.upload.pipeline_version_id,
            enabled=True,
            service_account=params.pipeline.service_account or None,
        )
    return Scheduled(
        **prepared.filed(), recurring_run_id=created.recurring_run_id, name=name, cron=cron,
        max_concurrency=1, no_catchup=True, replaced=existing,
    )
