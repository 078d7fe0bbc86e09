"""The DVC remote on S3-compatible storage (``meddiff.data.s3.configure_dvc_remote``): a small tracked output
is pushed to and pulled back from a ``moto_server`` on loopback, in a throwaway git + DVC repository. The
remote's URL is committed in ``.dvc/config``; its endpoint stays in ``.dvc/config.local``; credentials
come from the environment only."""

from __future__ import annotations

import configparser
import hashlib
import shutil
from pathlib import Path

import meddiff_test_servers as servers  # tests/integration/servers.py, registered by conftest.py
import pytest

from meddiff.data import s3

REPO = Path(__file__).resolve().parents[2]
CREDENTIAL_WORDS = ("access_key_id", "secret_access_key", "session_token", "password", "credentialpath")


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_repository_dvc_config_holds_no_credentials() -> None:
    for name in (".dvc/config",):
        text = (REPO / name).read_text().lower()
        assert not [word for word in CREDENTIAL_WORDS if word in text], f"{name} holds credentials"


def test_push_and_pull_through_the_s3_remote(moto: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    servers.create_bucket(moto, "dvc")
    repo = servers.init_git_dvc_repo(tmp_path / "repo")
    processed = repo / "data" / "processed"
    (processed / "arrays").mkdir(parents=True)
    (processed / "meta.json").write_text('{"class_names": ["a", "b"]}\n')
    (processed / "arrays" / "image.bin").write_bytes(bytes(range(256)) * 64)
    (processed / "arrays" / "label.bin").write_bytes(b"\x00\x01" * 100)
    expected = tree_digest(processed)
    servers.dvc("add", "data/processed", cwd=repo)

    monkeypatch.setenv("MEDDIFF_S3_ENDPOINT_URL", moto)
    settings = s3.configure_dvc_remote(repo, url="s3://dvc/meddiff")
    assert settings == {"name": "storage", "url": "s3://dvc/meddiff", "endpointurl": moto}

    committed = configparser.ConfigParser()
    committed.read(repo / ".dvc" / "config")
    assert committed["core"]["remote"] == "storage"
    assert dict(committed["'remote \"storage\"'"]) == {"url": "s3://dvc/meddiff"}  # no endpoint, no secrets
    local = (repo / ".dvc" / "config.local").read_text()
    assert moto in local and "testing" not in local
    assert "config.local" in (repo / ".dvc" / ".gitignore").read_text()

    servers.dvc("push", cwd=repo)
    keys = servers.s3_keys(moto, "dvc", "meddiff/")
    assert len(keys) == len(expected) + 1, keys  # every file plus the directory listing (.dir)
    assert any(key.endswith(".dir") for key in keys)

    shutil.rmtree(processed)
    shutil.rmtree(repo / ".dvc" / "cache")
    servers.dvc("pull", cwd=repo)
    assert tree_digest(processed) == expected
    assert "in sync" in servers.dvc("status", "--cloud", cwd=repo)


def test_remote_url_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in s3.ENDPOINT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(s3.DVC_REMOTE_URL_VARIABLE, "s3://team-bucket/meddiff")
    repo = servers.init_git_dvc_repo(tmp_path / "repo")
    assert s3.configure_dvc_remote(repo) == {"name": "storage", "url": "s3://team-bucket/meddiff"}
    assert not (repo / ".dvc" / "config.local").exists()  # no endpoint: plain AWS S3
    with pytest.raises(ValueError, match="not an s3"):
        s3.configure_dvc_remote(repo, url="/mnt/share/dvc")
