"""Sharded ingest (issue 14): ``meddiff ingest --shard i/n`` ingests one shard of the patients;
``meddiff ingest-merge`` combines the ``n`` shard outputs into the normal interim / quarantine / report layout.

**Which shard a record belongs to.** A patient's shard is ``int(SHA-256(raw patient id)[:8]) mod n``
(:func:`shard_of`; stable across processes, machines and Python versions, unlike ``hash()``). Every record
of a patient goes to that shard: its Patient, Observations, Conditions, notes (files and
DocumentReferences), DICOM series (the series' smallest PatientID, as the ledger records it), BraTS cases
and lesion masks. Records with no resolvable patient (stray and unsafe files, unreadable DICOM files,
lines that are not JSON, resources the parsers cannot read, exact duplicates quarantined before parsing,
Bundle entries of types ingest does not read) go to shard :data:`UNASSIGNED_SHARD` (0), so each record is
in exactly one shard and the counts of the shards add up to those of one unsharded run.

**What each shard still does in full.** The inventory walk, the DICOM header scan (a series' patient is
known only from its headers, and a series may span folders) and the EHR parse are cheap and run in every
shard; pixel decoding, NIfTI writing, the suites and the manifest run only on the shard's own records.

**What the merge gives.** The manifest is the shards' manifests concatenated and sorted by pseudonym as
one run sorts it (identical to the unsharded manifest); images, masks and headers are copied across;
``quarantine.jsonl`` is the shards' files in shard order (the same lines as one run, grouped by shard);
``validation.json`` sums every count (records, reasons, kinds, manifest size, modalities, ignored Bundle
entries, suite rows and unexpected counts). One limit: a rule over a whole column (``Observation.id``
unique) sees one shard at a time, so two patients' Observations sharing an id are caught only when the
patients share a shard. ``gx/<table>.json`` holds the shards' GX results as a list (GX results cannot be
summed). Each shard output folder holds :data:`SHARD_FILE` naming its shard; the merge checks that every
shard ``0 … n-1`` is there exactly once.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from meddiff.data.ingest.manifest import HEADERS_DIR, MANIFEST_FILE
from meddiff.data.ingest.report import html_summary
from meddiff.data.quarantine import Ledger
from meddiff.data.validation import RECORD_ID
from meddiff.io import atomic_dir, read_json, write_json

#: the shard of every record that has no resolvable patient (stray files, unparsable lines, ...)
UNASSIGNED_SHARD = 0
#: written into each of a shard's three output folders: ``{"index": i, "count": n}``
SHARD_FILE = "shard.json"
#: the folder name suffix of a shard's outputs when the CLI chooses them (``data/interim-shard-1-of-4``)
SHARD_FOLDER_SUFFIX = "-shard-{index}-of-{count}"
#: bytes of the SHA-256 digest read as the shard hash (64 bits: uniform modulo any realistic shard count)
SHARD_HASH_BYTES = 8
#: the quarantine file of a ledger (:meth:`meddiff.data.quarantine.Ledger.write`) and its copies folder
QUARANTINE_FILE, QUARANTINE_COPIES = "quarantine.jsonl", "files"
#: folders of an interim output holding one file per patient (by pseudonym)
INTERIM_FILE_DIRS = ("images", "masks", HEADERS_DIR)
#: the data version file the stage runner writes into data folders (:data:`meddiff.stages.DATA_VERSION_FILE`)
DATA_VERSION_FILE = "data_version.json"
_SHARD_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (``0 <= index < count``); ``ValueError`` otherwise."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"a shard is i/n with 0 <= i < n, got {self.index}/{self.count}")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"i/n"`` (as ``--shard`` spells it) -> the shard; ``ValueError`` for anything else."""
        match = _SHARD_SPEC.match(text)
        if match is None:
            raise ValueError(f"--shard takes i/n (shard i of n, 0-based), got {text!r}")
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def label(self) -> str:
        """``1-of-4``: the shard in folder names."""
        return f"{self.index}-of-{self.count}"

    def owns(self, patient_id: str | None) -> bool:
        """Whether records of the raw ``patient_id`` (``None``/"" = no resolvable patient) belong here."""
        return shard_of(patient_id, self.count) == self.index

    def folder(self, base: Path) -> Path:
        """The sibling of ``base`` holding this shard's output: ``data/interim`` -> ``data/interim-shard-1-of-4``."""
        base = Path(base)
        return base.with_name(base.name + SHARD_FOLDER_SUFFIX.format(index=self.index, count=self.count))

    def to_dict(self) -> dict[str, int]:
        return {"index": self.index, "count": self.count}


def shard_of(patient_id: str | None, count: int) -> int:
    """The shard (``0 … count-1``) of the raw ``patient_id``: SHA-256 of its UTF-8 bytes, first
    :data:`SHARD_HASH_BYTES` bytes big-endian, modulo ``count``; :data:`UNASSIGNED_SHARD` without a patient."""
    if not patient_id:
        return UNASSIGNED_SHARD
    digest = hashlib.sha256(patient_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:SHARD_HASH_BYTES], "big") % count


def shard_ledger(ledger: Ledger, shard: Shard) -> Ledger:
    """A ledger of the records of ``ledger`` that belong to ``shard`` (the same objects, in the same order)."""
    kept = Ledger()
    for record in ledger.records:
        if shard.owns(record.patient_id):
            kept.add(record)
    return kept


def shard_frame(frame: pd.DataFrame, kind: str, ledger: Ledger) -> pd.DataFrame:
    """The rows of a table of record ``kind`` whose record is in ``ledger`` (index reset)."""
    in_ledger = {record.record_id for record in ledger.records if record.kind == kind}
    return frame[frame[RECORD_ID].isin(in_ledger)].reset_index(drop=True)


def write_shard_marker(folders: Iterable[Path], shard: Shard) -> None:
    """Write :data:`SHARD_FILE` into each output folder of a shard."""
    for folder in folders:
        write_json(Path(folder) / SHARD_FILE, shard.to_dict())


def read_shard_marker(folder: Path) -> Shard:
    """The shard a folder was written by; ``FileNotFoundError`` if it is no shard output."""
    path = Path(folder) / SHARD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {SHARD_FILE}; not the output of `meddiff ingest --shard i/n`")
    payload = read_json(path)
    return Shard(int(payload["index"]), int(payload["count"]))


def ordered_shards(folders: Sequence[Path], what: str) -> list[Path]:
    """``folders`` ordered by shard index; ``ValueError`` unless they are shards ``0 … n-1`` of one ``n``,
    each exactly once."""
    if not folders:
        raise ValueError(f"no {what} shard folders to merge")
    by_index: dict[int, Path] = {}
    counts = set()
    for folder in folders:
        shard = read_shard_marker(folder)
        counts.add(shard.count)
        if shard.index in by_index:
            raise ValueError(f"{what}: shard {shard.label} given twice ({by_index[shard.index]}, {folder})")
        by_index[shard.index] = Path(folder)
    if len(counts) != 1:
        raise ValueError(f"{what}: shard folders of different shard counts {sorted(counts)}")
    count = counts.pop()
    missing = sorted(set(range(count)) - set(by_index))
    if missing:
        raise ValueError(f"{what}: shards {missing} of {count} are missing")
    return [by_index[i] for i in range(count)]


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link ``source`` to ``target`` (no copy of image data on one file system), else copy it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _same_data_version(folders: Sequence[Path], target: Path) -> None:
    """Copy the shards' data version file into ``target``; ``ValueError`` if the shards read different drops."""
    versions = {(Path(f) / DATA_VERSION_FILE).read_text() for f in folders if (Path(f) / DATA_VERSION_FILE).is_file()}
    if len(versions) > 1:
        raise ValueError(f"the shards read different drops ({len(versions)} data versions); ingest them again")
    if versions:
        (target / DATA_VERSION_FILE).write_text(versions.pop())


def merge_interim(shards: Sequence[Path], target: Path) -> pd.DataFrame:
    """Copy images, masks and headers of every shard into ``target`` and write the merged manifest
    (sorted by pseudonym, as :func:`meddiff.data.ingest.manifest.assemble_manifest` sorts one run's).

    Raises ``RuntimeError`` if two shards wrote the same file or the same pseudonym.
    """
    frames = []
    for shard in shards:
        for folder in INTERIM_FILE_DIRS:
            for source in sorted((shard / folder).glob("*")):
                destination = target / folder / source.name
                if destination.exists():
                    raise RuntimeError(f"{folder}/{source.name} is in more than one shard")
                _link_or_copy(source, destination)
        frames.append(pd.read_parquet(shard / MANIFEST_FILE))
    non_empty = [frame for frame in frames if len(frame)]
    manifest = pd.concat(non_empty, ignore_index=True) if non_empty else frames[0]
    if not manifest["patient_id"].is_unique:
        raise RuntimeError("two shards admitted the same pseudonym (HMAC truncation collision or shards of two runs)")
    manifest = manifest.sort_values("patient_id").reset_index(drop=True)
    manifest.to_parquet(target / MANIFEST_FILE, index=False)
    return manifest


def merge_quarantine(shards: Sequence[Path], target: Path) -> None:
    """``quarantine.jsonl`` of every shard, in shard order, and their copies of the rejected files."""
    with (target / QUARANTINE_FILE).open("w", encoding="utf-8") as merged:
        for shard in shards:
            merged.write((shard / QUARANTINE_FILE).read_text(encoding="utf-8"))
            copies = shard / QUARANTINE_COPIES
            for source in sorted(p for p in copies.rglob("*") if p.is_file()) if copies.is_dir() else ():
                destination = target / QUARANTINE_COPIES / source.relative_to(copies)
                if not destination.exists():  # one raw file is one record, in one shard; never overwrite
                    _link_or_copy(source, destination)


def _summed(mappings: Iterable[dict[str, Any]]) -> dict[str, int]:
    total: Counter = Counter()
    for mapping in mappings:
        total.update(mapping)
    return dict(sorted(total.items()))


def _merged_suites(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per table: success of every shard, rows summed, each expectation's unexpected count summed.

    A shard whose table is empty ran no suite (no expectations): it adds no expectation rows.
    """
    suites: dict[str, Any] = {}
    for table in reports[0]["gx_suites"]:
        parts = [report["gx_suites"][table] for report in reports]
        listed = [part["expectations"] for part in parts if part["expectations"]]
        expectations = []
        for per_shard in zip(*listed, strict=True):
            first = per_shard[0]
            unexpected = sum(int(e["unexpected_count"]) for e in per_shard)
            expectations.append({**first, "success": all(e["success"] for e in per_shard),
                                 "unexpected_count": unexpected})
        suites[table] = {"success": all(part["success"] for part in parts),
                         "rows": sum(int(part["rows"]) for part in parts), "expectations": expectations}
    return suites


def merged_report(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The ``validation.json`` of the merged run from the shards' (every count summed).

    Raises ``ValueError`` if the shards were de-identified with keys of different origin.
    """
    methods = {json.dumps(report["deidentification"], sort_keys=True) for report in reports}
    if len(methods) != 1:
        raise ValueError(f"the shards were de-identified differently: {sorted(methods)}")
    by_kind: dict[str, dict[str, int]] = {}
    for report in reports:
        for kind, counts in report["by_kind"].items():
            entry = by_kind.setdefault(kind, {"records_in": 0, "accepted": 0, "quarantined": 0})
            for key in entry:
                entry[key] += int(counts[key])
    return {
        "records_in": sum(int(r["records_in"]) for r in reports),
        "accepted": sum(int(r["accepted"]) for r in reports),
        "quarantined": sum(int(r["quarantined"]) for r in reports),
        "quarantined_by_reason": _summed(r["quarantined_by_reason"] for r in reports),
        "by_kind": dict(sorted(by_kind.items())),
        "manifest_patients": sum(int(r["manifest_patients"]) for r in reports),
        "modalities": _summed(r["modalities"] for r in reports),
        "ignored_bundle_entries": _summed(r["ignored_bundle_entries"] for r in reports),
        "deidentification": reports[0]["deidentification"],
        "gx_suites": _merged_suites(reports),
    }


def merge_report(shards: Sequence[Path], target: Path) -> dict[str, Any]:
    """``validation.json`` and ``validation.html`` summed over the shards; ``gx/<table>.json`` lists the
    shards' GX results (``{"success": …, "shards": [result of shard 0, …]}``). Returns the payload."""
    reports = [read_json(shard / "validation.json") for shard in shards]
    payload = merged_report(reports)
    gx = target / "gx"
    gx.mkdir()
    for table, suite in payload["gx_suites"].items():
        results = [read_json(shard / "gx" / f"{table}.json") for shard in shards]
        write_json(gx / f"{table}.json", {"success": suite["success"], "shards": results})
    write_json(target / "validation.json", payload)
    expectations = {table: suite["expectations"] for table, suite in payload["gx_suites"].items()}
    (target / "validation.html").write_text(html_summary(payload, expectations), encoding="utf-8")
    return payload


@dataclass(frozen=True)
class MergedIngest:
    """What :func:`merge_ingest` wrote, with the summed counts (the fields of
    :class:`meddiff.data.ingest.run.IngestResult`; ``seconds``: the merge's wall clock)."""

    interim_dir: Path
    manifest: Path
    n_patients: int
    records_in: int
    accepted: int
    quarantined: int
    quarantined_by_reason: dict[str, int]
    shards: int
    seconds: float


def merge_ingest(
    interim_shards: Sequence[Path], quarantine_shards: Sequence[Path], report_shards: Sequence[Path],
    interim_dir: Path, quarantine_dir: Path, report_dir: Path,
) -> MergedIngest:
    """Merge the outputs of ``meddiff ingest --shard i/n`` for ``i = 0 … n-1`` into one run's layout.

    Each sequence holds one folder per shard, in any order (each carries :data:`SHARD_FILE`). The three
    outputs are written atomically. Raises ``ValueError`` when a shard is missing, given twice, of another
    shard count, or read another drop, and ``RuntimeError`` when two shards hold the same patient.
    """
    started = time.perf_counter()
    interim_parts = ordered_shards(interim_shards, "interim")
    quarantine_parts = ordered_shards(quarantine_shards, "quarantine")
    report_parts = ordered_shards(report_shards, "report")
    if not len(interim_parts) == len(quarantine_parts) == len(report_parts):
        raise ValueError("interim, quarantine and report shard folders are of different shard counts")
    with (
        atomic_dir(interim_dir) as interim,
        atomic_dir(quarantine_dir) as quarantine,
        atomic_dir(report_dir) as report,
    ):
        for folder in INTERIM_FILE_DIRS:
            (interim / folder).mkdir()
        manifest = merge_interim(interim_parts, interim)
        merge_quarantine(quarantine_parts, quarantine)
        payload = merge_report(report_parts, report)
        _same_data_version(interim_parts, interim)
        _same_data_version(quarantine_parts, quarantine)
    return MergedIngest(
        interim_dir=Path(interim_dir), manifest=Path(interim_dir) / MANIFEST_FILE, n_patients=len(manifest),
        records_in=payload["records_in"], accepted=payload["accepted"], quarantined=payload["quarantined"],
        quarantined_by_reason=payload["quarantined_by_reason"], shards=len(interim_parts),
        seconds=round(time.perf_counter() - started, 2),
    )


def shard_output_folders(shard: Shard, folders: dict[str, Path]) -> dict[str, Path]:
    """The output folders of ``ingest --shard``: the shard's sibling (:meth:`Shard.folder`) of each of the
    stage's ``folders`` (``{"interim_dir": data/interim}`` -> ``data/interim-shard-1-of-4``), where
    ``ingest-merge`` reads them."""
    return {argument: shard.folder(Path(folder)) for argument, folder in folders.items()}


def merge_ingest_shards(count: int, interim_dir: Path, quarantine_dir: Path, report_dir: Path) -> MergedIngest:
    """``meddiff ingest-merge --shards n``: merge shards ``0 … n-1`` written by ``ingest --shard i/n`` into
    ``interim_dir``, ``quarantine_dir`` and ``report_dir``, reading each shard from the sibling folders
    :meth:`Shard.folder` names; ``ValueError`` for ``count < 1``, see :func:`merge_ingest`."""
    if count < 1:
        raise ValueError(f"--shards must be at least 1, got {count}")
    targets = (Path(interim_dir), Path(quarantine_dir), Path(report_dir))
    shards = [Shard(index, count) for index in range(count)]
    return merge_ingest(*([s.folder(target) for s in shards] for target in targets), *targets)


class _PathArtifact(Protocol):
    path: str


def merge_component(
    interim_shards: Sequence[_PathArtifact], quarantine_shards: Sequence[_PathArtifact],
    report_shards: Sequence[_PathArtifact], interim: _PathArtifact, quarantine: _PathArtifact,
    report: _PathArtifact, version_output: str,
) -> dict[str, Any]:
    """The body of the Kubeflow ``ingest-merge`` component (``pipeline.ingest_shards > 1``): merge the
    collected shard artifacts of a ``dsl.ParallelFor`` (:func:`merge_ingest`) into the task's outputs and
    write the shards' data version (one drop: one version) to the ``OutputPath`` ``version_output``.

    Returns the merge result as a JSON-friendly dict plus ``data_version``, as the ingest component does.
    """
    result = merge_ingest([Path(a.path) for a in interim_shards], [Path(a.path) for a in quarantine_shards],
                          [Path(a.path) for a in report_shards], Path(interim.path), Path(quarantine.path),
                          Path(report.path))
    version_file = Path(interim.path) / DATA_VERSION_FILE
    data_version = str(read_json(version_file)["data_version"]) if version_file.is_file() else ""
    Path(version_output).parent.mkdir(parents=True, exist_ok=True)
    Path(version_output).write_text(data_version)
    payload = json.loads(json.dumps(asdict(result), default=str))
    return {**payload, "data_version": data_version}
