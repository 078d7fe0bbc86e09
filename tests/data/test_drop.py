"""Raw drops named by a URI (:mod:`meddiff.data.drop`): their content hash (the data version), S3 and DVC
fetches against real servers/repositories on this machine, and the errors a user sees."""

from __future__ import annotations

import hashlib
from pathlib import Path, PurePosixPath

import boto3
import pytest
import yaml

from meddiff.cli import main
from meddiff.data import drop, s3
from meddiff.data.drop import DropError, DropNotFoundError
from tests.data.conftest import integration_servers

URI = "s3://hospital/exports/2026-11"



def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for relative, body in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
    return root


DROP = {
    "ehr/Patient.ndjson": b'{"resourceType": "Patient", "id": "p1"}\n',
    "notes/p1.txt": b"Headache since this morning.",
    "imaging/p1/s1/x/1.dcm": bytes(range(256)) * 4,
}


# ------------------------------------------------------------------------------------------ hashing


def test_manifest_version_is_sha256_of_the_sorted_manifest() -> None:
    entries = [("b.txt", "0" * 32), ("a/x.txt", "1" * 32)]
    expected = hashlib.sha256(f"a/x.txt\t{'1' * 32}\nb.txt\t{'0' * 32}\n".encode()).hexdigest()
    assert drop.manifest_version(entries) == f"sha256:{expected}"
    assert drop.manifest_version(reversed(entries)) == drop.manifest_version(entries)  # listing order is irrelevant
    with pytest.raises(ValueError, match="twice"):
        drop.manifest_version([("a", "1" * 32), ("a", "2" * 32)])


def test_folder_version_same_content_same_version_one_byte_changes_it(tmp_path: Path) -> None:
    first = write_tree(tmp_path / "first", DROP)
    second = write_tree(tmp_path / "second", DROP)  # same files elsewhere (modification times differ)
    assert drop.folder_version(first) == drop.folder_version(second)

    changed = bytearray(DROP["imaging/p1/s1/x/1.dcm"])
    changed[100] ^= 1
    (second / "imaging/p1/s1/x/1.dcm").write_bytes(bytes(changed))
    assert drop.folder_version(second) != drop.folder_version(first)

    renamed = write_tree(tmp_path / "renamed", {**{k: v for k, v in DROP.items() if k != "notes/p1.txt"},
                                                 "notes/p2.txt": DROP["notes/p1.txt"]})
    assert drop.folder_version(renamed) != drop.folder_version(first)  # paths are part of the version
    (first / "extra.txt").write_bytes(b"")
    assert drop.folder_version(first) != drop.folder_version(second)  # an added empty file counts too


def test_symbolic_links_are_listed_not_followed(tmp_path: Path) -> None:
    """Ingest quarantines links unread; the version names the link, not the bytes behind it."""
    outside = write_tree(tmp_path / "outside", {"secret.txt": b"elsewhere"})
    folder = write_tree(tmp_path / "drop", DROP)
    (folder / "notes" / "p9.txt").symlink_to(outside / "secret.txt")
    (folder / "imaging" / "linked").symlink_to(outside, target_is_directory=True)
    manifest = dict(drop.folder_manifest(folder))
    assert manifest["notes/p9.txt"] == "link:" + hashlib.md5(str(outside / "secret.txt").encode()).hexdigest()
    assert manifest["imaging/linked"].startswith("link:")
    assert not [path for path in manifest if path.startswith("imaging/linked/")]
    before = drop.folder_version(folder)
    (outside / "secret.txt").write_bytes(b"changed elsewhere")
    assert drop.folder_version(folder) == before


def test_s3_version_uses_etags_and_matches_the_folder_for_single_part_uploads(tmp_path: Path) -> None:
    folder = write_tree(tmp_path / "drop", DROP)
    objects = [
        s3.S3Object(f"exports/{key}", PurePosixPath(key), f'"{hashlib.md5(body).hexdigest()}"', len(body))
        for key, body in DROP.items()
    ]
    assert drop.s3_version(objects) == drop.folder_version(folder)
    # a multipart upload of the same bytes has another ETag, so another version
    multipart = [*objects[:-1], s3.S3Object(objects[-1].key, objects[-1].relative, '"abc-2"', objects[-1].size)]
    assert drop.s3_version(multipart) != drop.s3_version(objects)
    assert drop.etag_md5('"d41d8cd98f00b204e9800998ecf8427e"') == "d41d8cd98f00b204e9800998ecf8427e"


# ------------------------------------------------------------------------------------------ local


def test_local_folder_is_read_in_place(tmp_path: Path) -> None:
    folder = write_tree(tmp_path / "drop", DROP)
    for uri in (str(folder), f"file://{folder}"):
        fetched = drop.fetch_drop(uri)
        assert fetched.folder == folder and fetched.files == len(DROP) and fetched.source == drop.DropSource.LOCAL
        assert fetched.data_version == drop.folder_version(folder)


def test_local_errors_name_the_uri(tmp_path: Path) -> None:
    with pytest.raises(DropNotFoundError, match=rf"{tmp_path / 'missing'}: no such folder"):
        drop.fetch_drop(tmp_path / "missing")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DropNotFoundError, match=rf"{tmp_path / 'empty'}: the folder holds no files"):
        drop.fetch_drop(tmp_path / "empty")


# ------------------------------------------------------------------------------------------ S3


def upload(client: object, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    for key, body in files.items():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=body)  # single part: ETag = MD5


def test_s3_drop_is_fetched_and_hashed_by_its_etags(moto: str, tmp_path: Path) -> None:
    client = s3.s3_client()
    client.create_bucket(Bucket="hospital")
    upload(client, "hospital", "exports/2026-11", DROP)
    upload(client, "hospital", "exports/2026-11x", {"not-mine.txt": b"sibling prefix"})

    fetched = drop.fetch_drop(URI)

    assert fetched.source == drop.DropSource.S3 and fetched.files == len(DROP)
    assert fetched.folder == s3.staging_dir(s3.parse_s3_uri(URI))
    assert {p.relative_to(fetched.folder).as_posix(): p.read_bytes() for p in fetched.folder.rglob("*")
            if p.is_file()} == DROP
    listed = s3.list_objects(s3.parse_s3_uri(URI), client)
    assert fetched.data_version == drop.s3_version(listed) == drop.folder_version(fetched.folder)

    client.put_object(Bucket="hospital", Key="exports/2026-11/notes/p1.txt", Body=b"Headache since this evening.")
    refetched = drop.fetch_drop(URI)
    assert refetched.data_version != fetched.data_version
    assert (refetched.folder / "notes/p1.txt").read_bytes() == b"Headache since this evening."


def test_s3_object_replaced_during_the_fetch_is_refused(moto: str, tmp_path: Path) -> None:
    client = s3.s3_client()
    client.create_bucket(Bucket="hospital")
    upload(client, "hospital", "exports/2026-11", DROP)
    (listed, *_) = s3.list_objects(s3.parse_s3_uri(URI), client)
    client.put_object(Bucket="hospital", Key=listed.key, Body=b"replaced after the listing")
    with pytest.raises(Exception) as raised:
        s3.download_object(client, "hospital", listed, tmp_path / "out", if_match=listed.etag)
    error = drop._s3_error(URI, raised.value)
    assert str(error) == f"{URI}: an object changed while the drop was read; fetch it again"


def test_s3_errors_name_the_uri_and_the_reason(moto: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DropNotFoundError, match=rf"^{URI}: bucket 'hospital' does not exist \(endpoint {moto}\)$"):
        drop.fetch_drop(URI)
    s3.s3_client().create_bucket(Bucket="hospital")
    with pytest.raises(DropNotFoundError, match=rf"^{URI}: no objects under this prefix \(endpoint {moto}\)$"):
        drop.fetch_drop(URI)

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # boto3's default session caches resolved credentials
    with pytest.raises(DropError, match=rf"^{URI}: no S3 credentials \(set AWS_ACCESS_KEY_ID"):
        drop.fetch_drop(URI)


def test_cli_ingest_reports_a_bad_drop_on_one_line(moto: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ingest", "--raw-uri", URI]) == 2
    assert capsys.readouterr().err.strip() == (
        f"meddiff ingest: error: {URI}: bucket 'hospital' does not exist (endpoint {moto})"
    )


# ------------------------------------------------------------------------------------------ DVC


def test_dvc_drop_at_a_revision_carries_the_md5_dvc_records(tmp_path: Path) -> None:
    servers = integration_servers()
    repo = servers.init_git_dvc_repo(tmp_path / "repo")
    raw = write_tree(repo / "data" / "raw", DROP)
    versions = {}
    for rev in ("v1", "v2"):
        servers.dvc("add", "-q", "data/raw", cwd=repo)
        servers.run(["git", "add", "-A"], repo)
        servers.run(["git", "commit", "-qm", rev], repo)
        servers.run(["git", "tag", rev], repo)
        (out,) = yaml.safe_load((repo / "data" / "raw.dvc").read_text())["outs"]
        versions[rev] = out["md5"]
        (raw / "notes" / "p1.txt").write_bytes(b"Headache, revised.")  # the next revision's change

    fetched = drop.fetch_drop(f"dvc://{repo}?path=data/raw&rev=v1", tmp_path / "v1")
    assert fetched.data_version == f"dvc-md5:{versions['v1']}" and versions["v1"].endswith(".dir")
    assert fetched.source == drop.DropSource.DVC and fetched.files == len(DROP)
    assert (tmp_path / "v1" / "notes" / "p1.txt").read_bytes() == DROP["notes/p1.txt"]
    second = drop.fetch_drop(f"dvc://{repo}?path=data/raw&rev=v2", tmp_path / "v2")
    assert second.data_version == f"dvc-md5:{versions['v2']}" != fetched.data_version
    assert (tmp_path / "v2" / "notes" / "p1.txt").read_bytes() == b"Headache, revised."

    with pytest.raises(DropError, match=r"DVC records no hash for 'data/raw/notes'"):
        drop.fetch_drop(f"dvc://{repo}?path=data/raw/notes&rev=v1", tmp_path / "sub")
    with pytest.raises(DropNotFoundError, match=r"'data/other' does not exist in the repository at rev 'v1'"):
        drop.fetch_drop(f"dvc://{repo}?path=data/other&rev=v1", tmp_path / "other")


@pytest.mark.parametrize(
    ("uri", "repo", "path", "rev"),
    [
        ("dvc://https://github.com/org/data?path=raw/2026-11&rev=v1", "https://github.com/org/data", "raw/2026-11",
         "v1"),
        ("dvc:///srv/data?path=/raw/", "/srv/data", "raw", ""),
        ("dvc://?path=data/raw&rev=main", "", "data/raw", "main"),
    ],
)
def test_parse_dvc_uri(uri: str, repo: str, path: str, rev: str) -> None:
    assert drop.parse_dvc_uri(uri) == drop.DvcLocation(repo, path, rev)


def test_dvc_uri_errors() -> None:
    with pytest.raises(DropError, match=r"dvc:///srv/data: no path \(expected dvc://<repo>\?path="):
        drop.parse_dvc_uri("dvc:///srv/data")
    with pytest.raises(DropError, match=r"unknown keys \['revision'\]"):
        drop.parse_dvc_uri("dvc:///srv/data?path=raw&revision=v1")
