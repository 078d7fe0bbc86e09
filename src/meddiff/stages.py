"""Run any stage of :data:`meddiff.stage_table.STAGES`, the same way under every shell.

Each stage is one library function ``fn(params, **folders) -> result``. The CLI (and the DVC stages,
which call the CLI) go through :func:`run_stage`; the Kubeflow components go through
:func:`run_component`, which adds only what a KFP task needs (params as JSON, the data version, the
``Output[Metrics]`` artifact). Modules are imported only when a stage runs: ``meddiff --help`` stays fast.

**Data version.** The stage that reads the raw drop (the table's :attr:`~meddiff.stage_table.Stage.fetches`,
ingest) fetches it from its URI or reads its folder, and its content hash (:mod:`meddiff.data.drop`) is
the run's data version. Every stage runs with it in ``$MEDDIFF_DATA_VERSION`` (MLflow run and model
version tags, :func:`meddiff.tracking.run_tags`). Between stages run as separate processes (CLI, DVC) it
travels with the data: :data:`DATA_VERSION_FILE` is written into every data and model folder a stage
writes from then on, and read from the first input folder that has it. On Kubeflow the ingest task
returns it as an output parameter that every later task receives.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Protocol

from meddiff.config import Params, params_from_dict
from meddiff.io import read_json, write_json
from meddiff.stage_table import STAGES, ArtifactKind, Stage

#: Environment variable through which a run's data version reaches the stage (MLflow tags, logs).
DATA_VERSION_ENV = "MEDDIFF_DATA_VERSION"
#: File holding ``{"data_version": ...}`` in every data and model folder written from the fetching stage on.
DATA_VERSION_FILE = "data_version.json"
#: The self-contained HTML page a report stage writes into its output folder (a KFP ``Output[HTML]``).
REPORT_PAGE = "index.html"


def stage(name: str) -> Stage:
    """The table row of ``name``; :class:`KeyError` naming the known stages otherwise."""
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; stages are {list(STAGES)}")
    return STAGES[name]


def default_paths(params: Params, name: str) -> dict[str, Path]:
    """The stage's folders as ``params.paths`` defines them, keyed by the function's arguments."""
    resolved = {}
    for port in stage(name).ports:
        base = Path(getattr(params.paths, port.path))
        resolved[port.argument] = base / port.sub if port.sub else base
    return resolved


def run_stage(name: str, params: Params, **paths: str | Path | None) -> Any:
    """Run one stage; folders not given (or ``None``) default to ``params.paths``.

    The stage that fetches (ingest) also takes its URI (``raw_uri=``; ``None`` → the key ``raw_uri`` of its
    params section, "" → the folder), see :func:`run_versioned`.

    Raises:
        KeyError: unknown stage.
        TypeError: a folder the stage does not take.
        meddiff.data.drop.DropError: the drop cannot be read (names the URI and the reason).
    """
    spec = stage(name)
    uri = paths.pop(spec.uri_argument, None) if spec.uri_argument else None
    result, _ = run_versioned(name, params, None if uri is None else str(uri), None, **paths)
    return result


def run_versioned(
    name: str, params: Params, uri: str | None = None, data_version: str | None = None, *,
    options: dict[str, Any] | None = None, **paths: str | Path | None
) -> tuple[Any, str]:
    """Run one stage under its data version; return ``(result, data version)`` ("" when unknown).

    Args:
        name, params, paths: as :func:`run_stage`.
        uri: the fetching stage only: the drop to read (:func:`meddiff.data.drop.fetch_drop`); ``None`` reads
            the stage params' ``raw_uri``; "" (or no URI there) reads the input folder, which may itself be
            an ``s3://`` URI.
        data_version: other stages: the version to run under; ``None`` → the one recorded in the first input
            folder that has :data:`DATA_VERSION_FILE`, else ``$MEDDIFF_DATA_VERSION``, else "".
        options: keyword arguments of the stage function other than folders (``{"shard": "1/4"}`` for
            ``ingest --shard``).
    """
    spec = stage(name)
    arguments = {port.argument for port in spec.ports}
    unknown = set(paths) - arguments
    if unknown:
        raise TypeError(f"stage {name!r} takes folders {sorted(arguments)}, not {sorted(unknown)}")
    if uri is not None and not spec.fetches:
        raise TypeError(f"stage {name!r} reads no URI; only {[s.name for s in STAGES.values() if s.fetches]} do")
    resolved = default_paths(params, name)
    resolved.update({k: Path(v) for k, v in paths.items() if v is not None})
    if spec.fetches:
        drop = _read_drop(spec, params, uri, resolved[spec.fetches])
        resolved[spec.fetches] = drop.folder
        version = drop.data_version
    else:
        version = data_version if data_version is not None else _recorded_version(spec, resolved)
    function = getattr(importlib.import_module(spec.module), spec.function)
    with _exported(version):
        result = function(params, **resolved, **(options or {}))
    if version:
        for port in spec.outputs:
            folder = Path(resolved[port.argument])
            if port.kind in (ArtifactKind.DATASET, ArtifactKind.MODEL) and folder.is_dir():
                write_json(folder / DATA_VERSION_FILE, {"data_version": version})
    return result, version


def _read_drop(spec: Stage, params: Params, uri: str | None, folder: Path) -> Any:  # -> drop.Drop
    from meddiff.data import drop, s3

    if uri is None:
        section, key = spec.uri_params.split(".")  # the stage's own section (ingest.raw_uri) unless it names another
        uri = getattr(getattr(params, section), key)
    if not uri and s3.is_s3_uri(folder):  # --raw-dir s3://… (a Path spells it s3:/…)
        uri = os.fspath(folder)
    if uri:
        return drop.fetch_drop(uri)
    if not folder.is_dir():
        raise drop.DropNotFoundError(
            f"{folder}: raw data directory not found; run `meddiff cohort` first, or give {spec.uri_argument}"
        )
    return drop.describe_folder(folder)


def _recorded_version(spec: Stage, folders: dict[str, Path]) -> str:
    for port in spec.inputs:
        recorded = Path(folders[port.argument]) / DATA_VERSION_FILE
        if recorded.is_file():
            return str(read_json(recorded)["data_version"])
    return os.environ.get(DATA_VERSION_ENV, "")


@contextmanager
def _exported(version: str) -> Iterator[None]:
    """``$MEDDIFF_DATA_VERSION`` set to ``version`` (when not "") while the stage runs, then restored."""
    before = os.environ.get(DATA_VERSION_ENV)
    if version:
        os.environ[DATA_VERSION_ENV] = version
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(DATA_VERSION_ENV, None)
        else:
            os.environ[DATA_VERSION_ENV] = before


def result_to_dict(result: Any) -> dict[str, Any]:
    """A stage result (a dataclass or dict) as a JSON-friendly dict."""
    if is_dataclass(result) and not isinstance(result, type):
        payload = asdict(result)
    elif isinstance(result, dict):
        payload = result
    else:
        raise TypeError(f"stage results are dataclasses or dicts, got {type(result).__name__}")
    return json.loads(json.dumps(payload, default=str))


class _PathArtifact(Protocol):
    path: str


class _MetricsArtifact(Protocol):
    def log_metric(self, metric: str, value: float) -> None: ...


def run_component(
    name: str, params_json: str, data_version: str = "", metrics: _MetricsArtifact | None = None,
    html: _PathArtifact | None = None, uri: str | None = None, version_output: str | None = None,
    result_outputs: dict[str, str] | None = None, options: dict[str, Any] | None = None,
    **artifacts: _PathArtifact | None,
) -> dict[str, Any]:
    """The body of every Kubeflow component: run stage ``name`` on KFP artifacts.

    Args:
        name: the stage.
        params_json: the validated params as JSON (the pipeline parameter), validated again here.
        data_version: the version of the data the run reads (the fetching task's output); exported as
            ``$MEDDIFF_DATA_VERSION`` for the stage's MLflow tags and returned with the result. The fetching
            stage (ingest) computes it instead.
        metrics: the task's ``Output[Metrics]``, for stages with a ``metrics_file``: every finite
            numeric leaf of that JSON file is logged under its dotted key (``test.auc_macro.value``).
        html: the task's ``Output[HTML]``: the report page (:data:`REPORT_PAGE`) the stage wrote into its
            one output folder that has one is copied there, for the KFP UI.
        uri: the fetching stage: the pipeline's ``raw_uri``; "" reads the input artifact (the cohort's).
        version_output: the fetching stage: the path of its ``OutputPath(str)`` parameter ``data_version``,
            which receives the content hash of the drop read.
        result_outputs: result field → path of an ``OutputPath`` parameter that receives that field as JSON
            (``{"retrain": retrain}``: a later ``dsl.If`` can branch on it; KFP reads ``true``/``false``).
        options: stage function keywords other than folders, as :func:`run_versioned` (an ingest shard).
        artifacts: the task's input and output artifacts by KFP name (``raw``, ``report``); each
            artifact's ``path`` is handed to the stage as the folder of the same port. An optional input
            that is absent (``None``) is left out.

    Returns:
        The stage result as a JSON-friendly dict plus ``data_version``.

    Raises:
        TypeError: an artifact the stage does not take; a fetching stage with neither URI nor input.
    """
    from meddiff.tracking import numeric_leaves

    spec = stage(name)
    params = params_from_dict(json.loads(params_json), source="params_json")
    by_artifact = {port.artifact: port.argument for port in spec.ports}
    unknown = set(artifacts) - set(by_artifact)
    if unknown:
        raise TypeError(f"component {name!r} takes artifacts {sorted(by_artifact)}, not {sorted(unknown)}")
    folders = {by_artifact[key]: artifact.path for key, artifact in artifacts.items() if artifact is not None}
    if spec.fetches and not uri and spec.fetches not in folders:
        raise TypeError(f"component {name!r} needs {spec.uri_argument} or its {spec.port(spec.fetches).artifact} input")
    result, data_version = run_versioned(
        name, params, uri=(uri or "") if spec.fetches else None, data_version=data_version, options=options,
        **folders
    )
    if version_output is not None:
        Path(version_output).parent.mkdir(parents=True, exist_ok=True)
        Path(version_output).write_text(data_version)
    if metrics is not None:
        if not spec.metrics_file:
            raise TypeError(f"stage {name!r} declares no metrics_file to log as KFP metrics")
        argument, _, file_name = spec.metrics_file.partition("/")
        metrics_path = Path(folders[argument]) / file_name
        if not metrics_path.is_file():
            raise FileNotFoundError(f"{metrics_path}: stage {name!r} must write {file_name} to its {argument}")
        for key, value in numeric_leaves(json.loads(metrics_path.read_text())).items():
            metrics.log_metric(key, value)
    if html is not None:
        pages = [Path(folders[p.argument]) / REPORT_PAGE for p in spec.outputs if p.argument in folders]
        pages = [page for page in pages if page.is_file()]
        if len(pages) != 1:
            raise FileNotFoundError(f"stage {name!r} must write one {REPORT_PAGE} into its outputs, found {pages}")
        Path(html.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(pages[0], html.path)
    payload = result_to_dict(result)
    for field_name, output_path in (result_outputs or {}).items():
        if field_name not in payload:
            raise KeyError(f"stage {name!r} returns no {field_name!r}; it returns {sorted(payload)}")
        Path(output_path).parent.mkdir(parents=True, exist_ok=True)
        Path(output_path).write_text(json.dumps(payload[field_name]))
    return {**payload, "data_version": data_version}
