"""Run any stage of :data:`meddiff.stage_table.STAGES`, the same way under every shell.

Each stage is one library function ``fn(params, **folders) -> result``. The CLI (and the DVC stages,
which call the CLI) go through :func:`run_stage`; the Kubeflow components go through
:func:`run_component`, which adds only what a KFP task needs (params as JSON, the data version, the
``Output[Metrics]`` artifact). Modules are imported only when a stage runs: ``meddiff --help`` stays fast.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Protocol

from meddiff.config import Params, params_from_dict
from meddiff.stage_table import STAGES, Stage

#: Environment variable through which a run's data version reaches the stage (MLflow tags, logs).
DATA_VERSION_ENV = "MEDDIFF_DATA_VERSION"
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

    Raises:
        KeyError: unknown stage.
        TypeError: a folder the stage does not take.
    """
    spec = stage(name)
    arguments = {port.argument for port in spec.ports}
    unknown = set(paths) - arguments
    if unknown:
        raise TypeError(f"stage {name!r} takes folders {sorted(arguments)}, not {sorted(unknown)}")
    resolved = default_paths(params, name)
    resolved.update({k: Path(v) for k, v in paths.items() if v is not None})
    function = getattr(importlib.import_module(spec.module), spec.function)
    return function(params, **resolved)


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
    html: _PathArtifact | None = None, **artifacts: _PathArtifact,
) -> dict[str, Any]:
    """The body of every Kubeflow component: run stage ``name`` on KFP artifacts.

    Args:
        name: the stage.
        params_json: the validated params as JSON (the pipeline parameter), validated again here.
        data_version: the version of the data the run reads; exported as ``$MEDDIFF_DATA_VERSION`` for
            the stage's MLflow tags and returned with the result.
        metrics: the task's ``Output[Metrics]``, for stages with a ``metrics_file``: every finite
            numeric leaf of that JSON file is logged under its dotted key (``test.auc_macro.value``).
        html: the task's ``Output[HTML]``: the report page (:data:`REPORT_PAGE`) the stage wrote into its
            one output folder that has one is copied there, for the KFP UI.
        artifacts: the task's input and output artifacts by KFP name (``raw``, ``report``); each
            artifact's ``path`` is handed to the stage as the folder of the same port.

    Returns:
        The stage result as a JSON-friendly dict plus ``data_version``.
    """
    from meddiff.tracking import numeric_leaves

    spec = stage(name)
    if data_version:
        os.environ[DATA_VERSION_ENV] = data_version
    params = params_from_dict(json.loads(params_json), source="params_json")
    by_artifact = {port.artifact: port.argument for port in spec.ports}
    unknown = set(artifacts) - set(by_artifact)
    if unknown:
        raise TypeError(f"component {name!r} takes artifacts {sorted(by_artifact)}, not {sorted(unknown)}")
    folders = {by_artifact[key]: artifact.path for key, artifact in artifacts.items()}
    result = run_stage(name, params, **folders)
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
    return {**result_to_dict(result), "data_version": data_version}
