"""Raw exports on S3-compatible storage (AWS S3, MinIO, SeaweedFS, ``moto_server`` in tests).

``meddiff ingest --raw-dir s3://bucket/exports/2024-06`` (or ``paths.raw`` set to such a URI, or the
same string handed to :func:`meddiff.stages.run_stage`) downloads every object under the prefix into a
local staging folder first, keeping the key layout below the prefix, and then ingests that folder as
usual. Only ``run_ingest`` calls :func:`stage_raw_dir`; every other path stays local.

Where it connects:

* endpoint: ``MEDDIFF_S3_ENDPOINT_URL``, else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, else
  ``MLFLOW_S3_ENDPOINT_URL`` (on the cluster the same object store serves MLflow), else AWS itself;
* credentials and region: boto3's standard chain (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_SESSION_TOKEN``, profiles, instance roles); region defaults to ``us-east-1``;
* staging folder: ``MEDDIFF_S3_STAGING_DIR`` if set, else ``<tmp>/meddiff-s3``; each call replaces the
  copy of that bucket/prefix, so a stage never mixes two exports.

A ``pathlib.Path`` collapses ``s3://bucket/prefix`` to ``s3:/bucket/prefix``; both spellings are accepted
(a local folder literally named ``s3:`` cannot be used as a raw folder).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

LOG = logging.getLogger(__name__)

ENDPOINT_VARIABLES = ("MEDDIFF_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
STAGING_VARIABLE = "MEDDIFF_S3_STAGING_DIR"
#: bytes written at a time when an object is streamed to a file
DOWNLOAD_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # no leading or trailing slash; "" for the whole bucket

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


def is_s3_uri(value: str | os.PathLike[str]) -> bool:
    """``s3://b/p``, or the ``s3:/b/p`` a ``Path`` makes of it."""
    return os.fspath(value).startswith("s3:/")


def parse_s3_uri(value: str | os.PathLike[str]) -> S3Location:
    text = os.fspath(value)
    if not is_s3_uri(text):
        raise ValueError(f"{text!r} is not an s3:// URI")
    rest = text[len("s3:"):].lstrip("/")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"{text!r}: no bucket in the S3 URI (expected s3://bucket/prefix)")
    return S3Location(bucket, prefix.strip("/"))


def endpoint_url() -> str | None:
    for name in ENDPOINT_VARIABLES:
        if os.environ.get(name):
            return os.environ[name]
    return None


def s3_client() -> Any:
    """A boto3 S3 client for the configured endpoint (path-style addressing when one is set, as MinIO needs)."""
    import boto3
    from botocore.config import Config

    endpoint = endpoint_url()
    config = Config(
        s3={"addressing_style": "path"} if endpoint else {}, retries={"max_attempts": 5, "mode": "standard"}
    )
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return boto3.client("s3", endpoint_url=endpoint, region_name=region, config=config)


def _relative_key(key: str, prefix: str) -> PurePosixPath | None:
    """The key below ``prefix`` as a safe relative path; ``None`` for folder markers."""
    relative = key[len(prefix) + 1:] if prefix else key
    if not relative or relative.endswith("/"):
        return None
    path = PurePosixPath(relative)
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(f"s3 key {key!r} would escape the staging folder")
    return path


@dataclass(frozen=True)
class S3Object:
    """One listed object: its key, the key below the prefix, its ETag as listed (quotes included), size."""

    key: str
    relative: PurePosixPath
    etag: str
    size: int


def list_objects(location: S3Location, client: Any = None) -> list[S3Object]:
    """Every object under ``location`` (folder markers left out), in key order."""
    client = client or s3_client()
    listing_prefix = f"{location.prefix}/" if location.prefix else ""
    objects: list[S3Object] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=location.bucket, Prefix=listing_prefix):
        for item in page.get("Contents", []):
            relative = _relative_key(item["Key"], location.prefix)
            if relative is not None:
                objects.append(S3Object(item["Key"], relative, item.get("ETag", ""), int(item.get("Size", 0))))
    return objects


def download_object(client: Any, bucket: str, item: S3Object, target: Path, if_match: str | None = None) -> Path:
    """Download ``item`` to ``target``/its relative key; with ``if_match`` only if its ETag still is that one
    (else botocore's ``ClientError`` ``PreconditionFailed``)."""
    destination = target.joinpath(*item.relative.parts)
    destination.parent.mkdir(parents=True, exist_ok=True)
    if if_match is None:
        client.download_file(bucket, item.key, str(destination))
        return destination
    body = client.get_object(Bucket=bucket, Key=item.key, IfMatch=if_match)["Body"]
    with open(destination, "wb") as handle:
        for chunk in body.iter_chunks(DOWNLOAD_CHUNK_BYTES):
            handle.write(chunk)
    return destination


def download_prefix(location: S3Location, target: Path, client: Any = None, workers: int = 8) -> int:
    """Download every object under ``location`` into ``target`` (created); return the number of files."""
    client = client or s3_client()
    objects = list_objects(location, client)
    if not objects:
        raise FileNotFoundError(f"{location.uri}: no objects under this prefix (endpoint {endpoint_url() or 'AWS'})")
    target.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(lambda item: download_object(client, location.bucket, item, target), objects))
    return len(objects)


def default_staging_root() -> Path:
    """``<tmp>/meddiff-s3``: where fetched drops are staged when ``$MEDDIFF_S3_STAGING_DIR`` is unset."""
    return Path(tempfile.gettempdir()) / "meddiff-s3"


def staging_dir(location: S3Location) -> Path:
    root = Path(os.environ.get(STAGING_VARIABLE) or default_staging_root())
    digest = hashlib.sha256(location.uri.encode()).hexdigest()[:12]
    return root / f"{location.bucket}-{digest}"


def stage_raw_dir(raw_dir: str | os.PathLike[str]) -> Path:
    """``raw_dir`` itself when local; for an ``s3://`` URI a fresh local copy of the export."""
    if not is_s3_uri(raw_dir):
        return Path(raw_dir)
    location = parse_s3_uri(raw_dir)
    target = staging_dir(location)
    if target.exists():
        shutil.rmtree(target)
    started = time.perf_counter()
    count = download_prefix(location, target)
    LOG.info("ingest: %d objects of %s staged in %s (%.1f s)", count, location.uri, target,
             time.perf_counter() - started)
    return target


# ------------------------------------------------------------------------------------------- DVC remote

#: the DVC remote's default URL: bucket ``dvc`` of the object store (infra/base/object-store)
DEFAULT_DVC_REMOTE_URL = "s3://dvc/meddiff"
DVC_REMOTE_URL_VARIABLE = "MEDDIFF_DVC_REMOTE_URL"


def configure_dvc_remote(repo: str | os.PathLike[str] = ".", url: str | None = None, endpoint: str | None = None,
                         name: str = "storage", dvc: str | None = None) -> dict[str, str]:
    """Make ``name`` the default DVC remote of ``repo``, on S3-compatible storage; return what was set.

    The URL (``url``, else ``$MEDDIFF_DVC_REMOTE_URL``, else ``s3://dvc/meddiff``) goes to ``.dvc/config``,
    which is committed; the endpoint (``endpoint``, else the variables of :func:`endpoint_url`) goes to
    ``.dvc/config.local``, which git ignores, because it differs between a laptop, CI and the cluster.
    Credentials go to neither: DVC reads ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (or a profile)
    from the environment at ``dvc push`` / ``dvc pull`` time. Same as::

        dvc remote add --force --default storage s3://dvc/meddiff
        dvc remote modify --local storage endpointurl http://object-store.meddiff.svc.cluster.local:9000
    """
    import subprocess
    import sys

    url = url or os.environ.get(DVC_REMOTE_URL_VARIABLE) or DEFAULT_DVC_REMOTE_URL
    if not is_s3_uri(url):
        raise ValueError(f"DVC remote URL {url!r} is not an s3:// URI")
    endpoint = endpoint or endpoint_url()
    if dvc is None:
        beside = Path(sys.executable).with_name("dvc")
        dvc = str(beside) if beside.is_file() else "dvc"

    def call(*args: str) -> None:
        result = subprocess.run([dvc, *args], cwd=repo, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"dvc {' '.join(args)} failed: {result.stderr.strip() or result.stdout.strip()}")

    call("remote", "add", "--force", "--default", name, url)
    settings = {"name": name, "url": url}
    if endpoint:
        call("remote", "modify", "--local", name, "endpointurl", endpoint)
        settings["endpointurl"] = endpoint
    return settings
