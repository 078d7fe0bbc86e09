"""MLflow helpers: where runs go, how they are tagged, how versions are registered.

Default store ``sqlite:///mlruns.db`` with artifacts under ``mlartifacts/`` (params ``tracking``);
the ``MLFLOW_TRACKING_URI`` environment variable overrides it (e.g. a tracking server on the
cluster). Runs carry the git commit, a hash of the processed data, a hash of the params and the data
version (``$MEDDIFF_DATA_VERSION``: the content hash of the raw drop ingest read, see
:mod:`meddiff.stages`); registered model versions carry the same tags, so a registered model can be
traced back to exactly what produced it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import subprocess
from pathlib import Path
from typing import Any

from meddiff.config import Params, TrackingConfig

LOG = logging.getLogger(__name__)
CANDIDATE_ALIAS = "candidate"
CHAMPION_ALIAS = "champion"
#: environment variables set by the pipeline shells, recorded as run tags when present
ENVIRONMENT_TAGS = {"MEDDIFF_PIPELINE_RUN": "meddiff.pipeline_run", "MEDDIFF_DATA_VERSION": "meddiff.data_version"}


def tracking_uri(config: TrackingConfig) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or config.tracking_uri


def setup_experiment(config: TrackingConfig) -> str:
    """Point MLflow at the configured store and return the experiment id (created if missing)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(config)
    _create_sqlite_store_atomically(uri, config)
    # MLflow 3's set_tracking_uri also exports $MLFLOW_TRACKING_URI, which tracking_uri() reads as the user's
    # override: left set, one stage's store would win over the next params' store in the same process.
    user_override = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if user_override is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = user_override
    client = MlflowClient()
    experiment = client.get_experiment_by_name(config.experiment)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        # A local store: keep artifacts in the configured folder rather than MLflow's default ./mlruns.
        artifact_location = Path(config.artifact_location).resolve().as_uri()
    return client.create_experiment(config.experiment, artifact_location=artifact_location)


def _create_sqlite_store_atomically(uri: str, config: TrackingConfig) -> None:
    """Create a new sqlite store beside its target and rename it in once its schema is complete.

    MLflow creates and migrates a new sqlite store in place; a process killed mid-migration leaves a
    store that no later run can open ("out-of-date database schema"), found by the crash-safety test.
    """
    if not uri.startswith("sqlite:///"):
        return
    target = Path(uri.removeprefix("sqlite:///"))
    if target.exists():
        return
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    staging.unlink(missing_ok=True)
    store = SqlAlchemyStore(f"sqlite:///{staging}", Path(config.artifact_location).resolve().as_uri())
    store.engine.dispose()
    os.replace(staging, target)


def git_commit() -> str:
    """The commit of the code that runs (``MEDDIFF_GIT_COMMIT`` in images, else ``git``)."""
    if os.environ.get("MEDDIFF_GIT_COMMIT"):
        return os.environ["MEDDIFF_GIT_COMMIT"]
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip()


def file_digest(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """MD5 of a file, the hash DVC uses for its cache, so the tag matches ``dvc.lock``."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def run_tags(params: Params, data_md5: str | None) -> dict[str, str]:
    tags = {"meddiff.git_commit": git_commit(), "meddiff.params_hash": params.digest()}
    if data_md5 is not None:
        tags["meddiff.data_md5"] = data_md5
    for variable, tag in ENVIRONMENT_TAGS.items():
        if os.environ.get(variable):
            tags[tag] = os.environ[variable]
    return tags


def flatten(payload: dict[str, Any] | list[Any], prefix: str = "", lists: bool = False) -> dict[str, Any]:
    """``{"train": {"epochs": 3}}`` → ``{"train.epochs": 3}`` (MLflow params and KFP metrics are flat).

    With ``lists``, list items are flattened too under their index (``robustness.0.auc_macro``);
    otherwise a list is one value.
    """
    items = enumerate(payload) if isinstance(payload, list) else payload.items()
    flat: dict[str, Any] = {}
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, dict) or (lists and isinstance(value, list)):
            flat.update(flatten(value, f"{name}.", lists))
        else:
            flat[name] = value
    return flat


def numeric_leaves(payload: dict[str, Any]) -> dict[str, float]:
    """Every finite number of a JSON report under its dotted key (booleans, strings, NaN left out)."""
    return {
        key: float(value)
        for key, value in flatten(payload, lists=True).items()
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    }


def tag_model_version(model_name: str, version: str | int, tags: dict[str, str]) -> None:
    """Set ``tags`` (a run's :func:`run_tags`: commit, params hash, ``meddiff.data_version``…) on a registered
    model version, so the registry alone says which code, params and data made it."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(model_name, str(version), key, value)


def set_alias(model_name: str, alias: str, version: str | int) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient().set_registered_model_alias(model_name, alias, str(version))
    LOG.info("model %s version %s now has alias %r", model_name, version, alias)
