"""A new sqlite MLflow store appears complete or not at all (a kill mid-migration cannot break it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from meddiff import tracking
from meddiff.config import TrackingConfig


def test_new_sqlite_store_is_created_beside_and_renamed_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".mlruns.db.999.tmp").write_text("left by a killed run")  # a stale staging file
    config = TrackingConfig(tracking_uri="sqlite:///sub/mlruns.db", artifact_location="art")
    first = tracking.setup_experiment(config)
    assert tracking.setup_experiment(config) == first  # the store opens again with its experiment
    assert (tmp_path / "sub" / "mlruns.db").is_file()
    assert not list((tmp_path / "sub").glob(f".mlruns.db.{os.getpid()}.tmp"))


def test_each_params_store_is_used_and_the_user_override_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's set_tracking_uri exports $MLFLOW_TRACKING_URI; a second params' store must still win in the
    same process (it did not: the first store leaked into every later stage), and a user's variable stays."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/a.db", artifact_location=str(tmp_path / "a"))
    second = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/b.db", artifact_location=str(tmp_path / "b"))
    tracking.setup_experiment(first)
    tracking.setup_experiment(second)
    assert mlflow.get_tracking_uri() == second.tracking_uri
    assert "MLFLOW_TRACKING_URI" not in os.environ
    monkeypatch.setenv("MLFLOW_TRACKING_URI", first.tracking_uri)
    tracking.setup_experiment(second)  # the user's variable overrides params and is left as it was
    assert mlflow.get_tracking_uri() == first.tracking_uri
    assert os.environ["MLFLOW_TRACKING_URI"] == first.tracking_uri


def test_data_version_tags_the_run_and_the_model_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``$MEDDIFF_DATA_VERSION`` (set by the stage runner) becomes ``meddiff.data_version`` on the run's tags,
    and :func:`tracking.tag_model_version` puts the same tags on a registered version (issue 13)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from meddiff.config import Params

    version_hash = "sha256:" + "ab" * 32
    monkeypatch.setenv("MEDDIFF_DATA_VERSION", version_hash)
    monkeypatch.setenv("MEDDIFF_GIT_COMMIT", "0123456789abcdef0123456789abcdef01234567")
    tags = tracking.run_tags(Params(), "d41d8cd98f00b204e9800998ecf8427e")
    assert tags["meddiff.data_version"] == version_hash

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns.db'}")
    client = MlflowClient()
    client.create_registered_model("meddiff-test")
    (tmp_path / "model").mkdir()
    version = client.create_model_version("meddiff-test", (tmp_path / "model").as_uri())
    tracking.tag_model_version("meddiff-test", version.version, tags)
    assert client.get_model_version("meddiff-test", version.version).tags == tags
