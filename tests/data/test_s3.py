"""Ingest from S3 (:mod:`meddiff.data.s3`): URI parsing, endpoint choice, and a real ingest of the tiny cohort
uploaded to a ``moto_server`` on loopback (started here, stopped at the end of each test)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from meddiff.data import s3
from meddiff.stages import run_stage


def upload_tree(local: Path, bucket: str, prefix: str) -> int:
    client = s3.s3_client()
    client.create_bucket(Bucket=bucket)
    files = [path for path in local.rglob("*") if path.is_file()]
    for path in files:
        client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")
    return len(files)


@pytest.mark.parametrize(
    ("value", "bucket", "prefix"),
    [
        ("s3://raw/exports/2024-06", "raw", "exports/2024-06"),
        ("s3://raw/exports/2024-06/", "raw", "exports/2024-06"),
        (Path("s3://raw/exports/2024-06"), "raw", "exports/2024-06"),  # Path collapses // to /
        ("s3:/raw/exports", "raw", "exports"),
        ("s3://raw", "raw", ""),
    ],
)
def test_parse_s3_uri(value: str | Path, bucket: str, prefix: str) -> None:
    assert str(Path("s3://raw/x")) == "s3:/raw/x"  # the reason both spellings are accepted
    assert s3.is_s3_uri(value)
    assert s3.parse_s3_uri(value) == s3.S3Location(bucket, prefix)


def test_local_paths_are_left_alone(tmp_path: Path) -> None:
    for value in ("data/raw", Path("data/raw"), tmp_path, "s3-exports/raw"):
        assert not s3.is_s3_uri(value)
        assert s3.stage_raw_dir(value) == Path(value)
    with pytest.raises(ValueError, match="no bucket"):
        s3.parse_s3_uri("s3://")
    with pytest.raises(ValueError, match="not an s3"):
        s3.parse_s3_uri("/data/raw")


def test_endpoint_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in s3.ENDPOINT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert s3.endpoint_url() is None
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://mlflow-store:9000")
    assert s3.endpoint_url() == "http://mlflow-store:9000"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://aws-endpoint:9000")
    assert s3.endpoint_url() == "http://aws-endpoint:9000"
    monkeypatch.setenv("MEDDIFF_S3_ENDPOINT_URL", "http://object-store:9000")
    assert s3.endpoint_url() == "http://object-store:9000"


def test_download_prefix_keeps_the_layout_and_only_the_prefix(moto: str, tmp_path: Path) -> None:
    client = s3.s3_client()
    client.create_bucket(Bucket="raw")
    objects = {
        "exports/a/notes/p1.txt": b"note",
        "exports/a/ehr/Patient.ndjson": b"{}\n",
        "exports/a/imaging/p1/s1/x/1.dcm": b"\0" * 10,
        "exports/a/": b"",  # a folder marker, as consoles create them
        "exports/ab/not-mine.txt": b"sibling prefix",
        "other/z.txt": b"elsewhere",
    }
    for key, body in objects.items():
        client.put_object(Bucket="raw", Key=key, Body=body)

    count = s3.download_prefix(s3.parse_s3_uri("s3://raw/exports/a"), tmp_path / "out")

    assert count == 3
    files = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert files == ["ehr/Patient.ndjson", "imaging/p1/s1/x/1.dcm", "notes/p1.txt"]
    assert (tmp_path / "out" / "notes" / "p1.txt").read_bytes() == b"note"

    with pytest.raises(FileNotFoundError, match=r"s3://raw/exports/missing"):
        s3.download_prefix(s3.parse_s3_uri("s3://raw/exports/missing"), tmp_path / "none")
    client.put_object(Bucket="raw", Key="evil/../../escape.txt", Body=b"x")
    with pytest.raises(ValueError, match="escape"):
        s3.download_prefix(s3.parse_s3_uri("s3://raw/evil"), tmp_path / "evil")


def test_ingest_from_s3_matches_a_local_ingest(moto: str, pipeline, tmp_path: Path) -> None:
    """The tiny cohort uploaded to S3 and ingested through ``run_stage`` (which makes the URI a ``Path``)."""
    uploaded = upload_tree(pipeline.raw, "raw", "exports/2024-06")
    out = tmp_path / "s3-ingest"

    result = run_stage(
        "ingest", pipeline.params, raw_dir="s3://raw/exports/2024-06", interim_dir=out / "interim",
        quarantine_dir=out / "quarantine", report_dir=out / "reports" / "ingest",
    )

    staged = s3.staging_dir(s3.parse_s3_uri("s3://raw/exports/2024-06"))
    assert staged.is_relative_to(tmp_path / "staging")
    assert sum(1 for p in staged.rglob("*") if p.is_file()) == uploaded
    local = json.loads((pipeline.ingest_report / "validation.json").read_text())
    remote = json.loads((out / "reports" / "ingest" / "validation.json").read_text())
    for key in ("records_in", "accepted", "quarantined", "quarantined_by_reason", "manifest_patients"):
        assert remote[key] == local[key], key
    assert result.records_in == local["records_in"] and result.n_patients == local["manifest_patients"]
    pd.testing.assert_frame_equal(pd.read_parquet(out / "interim" / "manifest.parquet"),
                                  pd.read_parquet(pipeline.interim / "manifest.parquet"))
