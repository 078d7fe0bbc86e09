"""A new sqlite MLflow store appears complete or not at all (a kill mid-migration cannot break it)."""

from __future__ import annotations

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
    assert not list((tmp_path / "sub").glob(f".mlruns.db.{__import__('os').getpid()}.tmp"))
