"""Fixtures with real servers on loopback (helpers in servers.py, loaded by path: tests are no package)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


def load_servers():
    """tests/integration/servers.py as the module ``meddiff_test_servers`` (loaded once)."""
    name = "meddiff_test_servers"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("servers.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


servers = load_servers()


@pytest.fixture
def moto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh ``moto_server``; yields its endpoint URL, with dummy AWS credentials in the environment."""
    for key, value in servers.DUMMY_AWS_ENV.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    with servers.moto_s3(tmp_path / "logs") as server:
        yield server.url
