"""A raw drop named by a URI: fetch it for ingest and say exactly which data it is (its data version).

The ingest stage reads a *raw drop*, the folder layout of ``docs/data.md`` (DICOM series, NIfTI masks,
FHIR R4 NDJSON or MIMIC-style CSV, notes). Besides a local folder, a drop may be named by a URI
(``ingest.raw_uri`` in ``params.yaml``, ``meddiff ingest --raw-uri``, the ``raw_uri`` parameter of the
Kubeflow pipeline):

=====================================================  ==========================================================
``s3://bucket/prefix``                                  every object under the prefix (endpoint and credentials:
                                                        :mod:`meddiff.data.s3`)
``dvc://<repo>?path=<path>&rev=<rev>``                  a DVC-tracked folder of a git repository at a revision,
                                                        read with ``dvc.api.DVCFileSystem``; ``<repo>`` is a git
                                                        URL (``dvc://https://github.com/org/data?path=raw&rev=v1``)
                                                        or a local path (``dvc:///srv/data?path=raw``), empty for
                                                        the repository of the working folder; ``rev`` defaults to
                                                        the repository's ``HEAD`` (a local repository's workspace)
``/a/folder``, ``file:///a/folder``                     a local folder, read in place
=====================================================  ==========================================================

:func:`fetch_drop` makes the drop a local folder (S3 and DVC drops are copied into a staging folder,
``$MEDDIFF_S3_STAGING_DIR`` or ``<tmp>/meddiff-s3``, replaced on every fetch) and returns its
**data version**, a content hash of what was actually read:

* ``sha256:<hex>`` for a folder or an S3 prefix: SHA-256 of the *manifest*, one line
  ``<relative path>\\t<md5>\\n`` per file, sorted by path. For S3 the md5 is the object's ETag as listed,
  and every object is downloaded with ``If-Match: <ETag>``, so the files read are those the version
  names (an object replaced during the fetch stops it). A single-part upload's ETag is the MD5 of its
  bytes, so a folder and the same folder uploaded to S3 have the same version; a multipart upload's
  ETag (``<md5>-<parts>``) gives the same bytes another version.
* ``dvc-md5:<md5>`` for a DVC path: the hash DVC records for it (``<md5>.dir`` for a tracked folder), as
  in its ``.dvc`` file or ``dvc.lock``.

Errors (:class:`DropError`, a :class:`meddiff.errors.UserError`) name the URI and the reason: no such
bucket, no objects under the prefix, no credentials, access denied, a path DVC does not track, a folder
that does not exist or is empty.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from urllib.parse import parse_qs

from meddiff.data import s3
from meddiff.errors import UserError

LOG = logging.getLogger(__name__)

#: scheme of a DVC-tracked drop (``dvc://<repo>?path=<path>&rev=<rev>``)
DVC_SCHEME = "dvc://"
FILE_SCHEME = "file://"
#: prefixes of the two data-version formats
MANIFEST_PREFIX = "sha256:"
DVC_PREFIX = "dvc-md5:"
#: manifest entry of a symbolic link in a folder drop: ``link:<md5 of its target path>``
LINK_PREFIX = "link:"
#: bytes read at a time when hashing or downloading a file
CHUNK_BYTES = 1 << 20
#: parallel downloads of an S3 drop
DOWNLOAD_WORKERS = 8


class DropError(UserError):
    """A drop that cannot be read; the message names the URI and the reason."""


class DropNotFoundError(DropError, FileNotFoundError):
    """The drop's bucket, prefix, path or folder does not exist or holds no files."""


class DropSource(StrEnum):
    S3 = "s3"
    DVC = "dvc"
    LOCAL = "local"


@dataclass(frozen=True)
class Drop:
    """A drop made local.

    Attributes:
        uri: as given.
        source: where it was read from.
        folder: the local folder holding the files read.
        data_version: the content hash of what was read (see the module docstring).
        files: number of files read.
    """

    uri: str
    source: DropSource
    folder: Path
    data_version: str
    files: int


# ------------------------------------------------------------------------------------------ hashing


def manifest_version(entries: Iterable[tuple[str, str]]) -> str:
    """``sha256:<hex>`` of the manifest of ``(relative posix path, md5 hex)`` pairs, in path order.

    Raises:
        ValueError: a path appears twice.
    """
    ordered = sorted(entries)
    paths = [path for path, _ in ordered]
    if len(set(paths)) != len(paths):
        raise ValueError("a path appears twice in the drop manifest")
    digest = hashlib.sha256()
    for path, md5 in ordered:
        digest.update(f"{path}\t{md5}\n".encode())
    return MANIFEST_PREFIX + digest.hexdigest()


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def folder_manifest(folder: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """``(relative posix path, md5)`` of every file below ``folder``.

    Walked as ingest walks a drop (``os.walk(followlinks=False)``): a symbolic link is never followed (ingest
    quarantines it unread); it is listed with ``link:`` and the MD5 of where it points.
    """
    root = Path(folder)
    manifest = []
    for directory, subdirectories, names in os.walk(root, followlinks=False):
        here = Path(directory)
        for name in [*names, *(d for d in subdirectories if (here / d).is_symlink())]:
            path = here / name
            relative = path.relative_to(root).as_posix()
            if path.is_symlink():
                manifest.append((relative, LINK_PREFIX + hashlib.md5(os.readlink(path).encode()).hexdigest()))
            elif path.is_file():
                manifest.append((relative, file_md5(path)))
    return manifest


def folder_version(folder: str | os.PathLike[str]) -> str:
    """The data version of a local folder (:func:`manifest_version` of :func:`folder_manifest`)."""
    return manifest_version(folder_manifest(folder))


def etag_md5(etag: str) -> str:
    """An S3 ETag as listed (``"<md5>"``, quotes included) without its quotes."""
    return etag.strip().strip('"')


def s3_version(objects: Iterable[s3.S3Object]) -> str:
    """The data version of listed S3 objects: :func:`manifest_version` of (key below the prefix, ETag)."""
    return manifest_version((item.relative.as_posix(), etag_md5(item.etag)) for item in objects)


# ------------------------------------------------------------------------------------------ fetching


def describe_folder(folder: str | os.PathLike[str], uri: str | None = None) -> Drop:
    """A local folder as a :class:`Drop`, read in place.

    Raises:
        DropNotFoundError: the folder does not exist or holds no files.
    """
    root = Path(folder)
    name = uri or str(root)
    if not root.is_dir():
        raise DropNotFoundError(f"{name}: no such folder")
    manifest = folder_manifest(root)
    if not manifest:
        raise DropNotFoundError(f"{name}: the folder holds no files")
    return Drop(name, DropSource.LOCAL, root, manifest_version(manifest), len(manifest))


def fetch_drop(uri: str | os.PathLike[str], target: str | os.PathLike[str] | None = None) -> Drop:
    """Make the drop ``uri`` a local folder and hash what was read.

    Args:
        uri: ``s3://bucket/prefix``, ``dvc://<repo>?path=<path>&rev=<rev>``, ``file:///folder`` or a folder.
        target: where an S3 or DVC drop is copied (replaced if it exists); default a staging folder of the
            URI (:func:`meddiff.data.s3.staging_dir` for S3). A local folder is read in place.

    Raises:
        DropNotFoundError: no such bucket, prefix, DVC path or folder, or nothing in it.
        DropError: no credentials, access denied, a path DVC does not track, an object changed while read.
    """
    text = os.fspath(uri)
    started = time.perf_counter()
    if s3.is_s3_uri(text):
        drop = _fetch_s3(text, None if target is None else Path(target))
    elif text.startswith(DVC_SCHEME):
        drop = _fetch_dvc(text, None if target is None else Path(target))
    else:
        drop = describe_folder(Path(text.removeprefix(FILE_SCHEME)) if text.startswith(FILE_SCHEME) else text, text)
    LOG.info("drop %s: %d files, data version %s (%.1f s)", drop.uri, drop.files, drop.data_version,
             time.perf_counter() - started)
    return drop


def _fresh(target: Path) -> Path:
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    return target


def _s3_error(uri: str, error: Exception) -> DropError:
    """A boto3/botocore error as a :class:`DropError` naming the URI and the reason."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    where = s3.endpoint_url() or "AWS"
    if isinstance(error, NoCredentialsError):
        return DropError(f"{uri}: no S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile)")
    if isinstance(error, EndpointConnectionError):
        return DropError(f"{uri}: the S3 endpoint {where} does not answer ({error})")
    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        bucket = s3.parse_s3_uri(uri).bucket
        if code == "NoSuchBucket":
            return DropNotFoundError(f"{uri}: bucket {bucket!r} does not exist (endpoint {where})")
        if code in {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"}:
            return DropError(f"{uri}: access denied ({code}): the credentials may not read bucket {bucket!r}")
        if code in {"PreconditionFailed", "412"}:
            return DropError(f"{uri}: an object changed while the drop was read; fetch it again")
        return DropError(f"{uri}: S3 error {code or type(error).__name__}: {error}")
    return DropError(f"{uri}: {error}")


def _fetch_s3(uri: str, target: Path | None) -> Drop:
    from botocore.exceptions import BotoCoreError, ClientError

    location = s3.parse_s3_uri(uri)
    target = target or s3.staging_dir(location)
    try:
        client = s3.s3_client()
        objects = s3.list_objects(location, client)
        if not objects:
            where = s3.endpoint_url() or "AWS"
            raise DropNotFoundError(f"{location.uri}: no objects under this prefix (endpoint {where})")
        _fresh(target)

        def download(item: s3.S3Object) -> None:
            s3.download_object(client, location.bucket, item, target, if_match=item.etag)

        with ThreadPoolExecutor(max_workers=DOWNLOAD_WORKERS) as pool:
            list(pool.map(download, objects))
    except (BotoCoreError, ClientError) as error:
        raise _s3_error(location.uri, error) from None
    return Drop(location.uri, DropSource.S3, target, s3_version(objects), len(objects))


@dataclass(frozen=True)
class DvcLocation:
    """``dvc://<repo>?path=<path>&rev=<rev>`` split up; ``repo`` "" is the working folder's repository."""

    repo: str
    path: str
    rev: str


def parse_dvc_uri(uri: str) -> DvcLocation:
    """Split a ``dvc://`` URI; :class:`DropError` without ``path=`` or with unknown query keys."""
    if not uri.startswith(DVC_SCHEME):
        raise DropError(f"{uri!r} is not a dvc:// URI")
    repo, _, query = uri[len(DVC_SCHEME):].partition("?")
    fields = parse_qs(query, keep_blank_values=True)
    unknown = set(fields) - {"path", "rev"}
    if unknown:
        raise DropError(f"{uri}: unknown keys {sorted(unknown)} (expected dvc://<repo>?path=<path>&rev=<rev>)")
    path = fields.get("path", [""])[-1].strip("/")
    if not path:
        raise DropError(f"{uri}: no path (expected dvc://<repo>?path=<path>&rev=<rev>)")
    return DvcLocation(repo, path, fields.get("rev", [""])[-1])


def _fetch_dvc(uri: str, target: Path | None) -> Drop:
    from dvc.api import DVCFileSystem
    from dvc.exceptions import DvcException
    from scmrepo.exceptions import SCMError

    location = parse_dvc_uri(uri)
    digest = hashlib.sha256(uri.encode()).hexdigest()[:12]
    target = target or Path(os.environ.get(s3.STAGING_VARIABLE) or s3.default_staging_root()) / f"dvc-{digest}"
    at = f"at rev {location.rev!r}" if location.rev else "at HEAD"
    try:
        fs = DVCFileSystem(location.repo or None, rev=location.rev or None)
        try:
            info = fs.info(location.path)
        except FileNotFoundError:
            raise DropNotFoundError(f"{uri}: {location.path!r} does not exist in the repository {at}") from None
        md5 = info.get("md5") or (info.get("dvc_info") or {}).get("md5")
        if not md5:
            raise DropError(f"{uri}: DVC records no hash for {location.path!r} {at}; point path= at a folder or file"
                            " DVC tracks itself (a .dvc file's or dvc.lock's out)")
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        if info.get("type") == "directory":
            fs.get(location.path, str(target), recursive=True)  # into an existing folder it would nest the path
        else:  # one tracked file (a CSV export): the drop is a folder holding it
            target.mkdir()
            fs.get(location.path, str(target / Path(location.path).name))
    except (DvcException, SCMError) as error:
        raise DropError(f"{uri}: DVC cannot read it: {error}") from None
    files = sum(1 for path in target.rglob("*") if path.is_file())
    if not files:
        raise DropNotFoundError(f"{uri}: {location.path!r} holds no files {at}")
    return Drop(uri, DropSource.DVC, target, DVC_PREFIX + md5, files)
