"""The record ledger of ``ingest``: every input item is one record, accepted or quarantined once.

``quarantine_dir/quarantine.jsonl`` gets one line per rejected record (kind, record id, patient, source
file, reason code, human message) and ``quarantine_dir/files/`` a copy of each rejected file, at its
path relative to the raw directory. The first reason given to a record is the one that counts.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meddiff.io import atomic_file

LOG = logging.getLogger(__name__)

RECORD_KINDS: tuple[str, ...] = (
    "patient", "observation", "condition", "note", "image_series", "lesion_mask", "file",
)


@dataclass
class Record:
    """One input item: what it is, where it came from and, once decided, why it was rejected."""

    kind: str
    record_id: str
    source: str
    patient_id: str | None = None
    files: tuple[Path, ...] = ()
    raw_text: str | None = None
    reason: str | None = None
    message: str | None = None

    @property
    def accepted(self) -> bool:
        return self.reason is None


@dataclass
class Ledger:
    """All records of one ingest run."""

    records: list[Record] = field(default_factory=list)
    _by_key: dict[tuple[str, str], Record] = field(default_factory=dict)  # (kind, record id) -> record

    def add(self, record: Record) -> Record:
        """Register a new record; ``ValueError`` for an unknown kind or a (kind, record id) seen before."""
        if record.kind not in RECORD_KINDS:
            raise ValueError(f"record kind must be one of {RECORD_KINDS}, got {record.kind!r}")
        key = (record.kind, record.record_id)
        if key in self._by_key:
            raise ValueError(f"record {record.kind}:{record.record_id} added twice")
        self._by_key[key] = record
        self.records.append(record)
        return record

    def add_file(self, path: Path, raw_dir: Path, *, keep_copy: bool = True) -> Record:
        """Register a whole raw file as a ``file`` record (a stray, unsafe or unreadable file).

        ``keep_copy=False`` leaves the file out of ``quarantine_dir/files`` (a symlink: copying it would
        follow the link out of the raw tree).
        """
        relative = str(path.relative_to(raw_dir))
        return self.add(Record("file", f"file/{relative}", relative, files=(path,) if keep_copy else ()))

    def get(self, kind: str, record_id: str) -> Record:
        """The record of ``kind`` with ``record_id``; ``KeyError`` naming both if there is none."""
        try:
            return self._by_key[(kind, record_id)]
        except KeyError:
            raise KeyError(f"no {kind} record {record_id!r} in the ledger") from None

    def quarantine(self, record: Record, reason: str, message: str) -> None:
        """Reject ``record`` (the first reason wins)."""
        if record.reason is None:
            record.reason = reason
            record.message = message

    def of_kind(self, kind: str, accepted: bool | None = None) -> list[Record]:
        return [r for r in self.records if r.kind == kind and (accepted is None or r.accepted == accepted)]

    def summary(self) -> dict[str, Any]:
        """records_in / accepted / quarantined, per reason and per kind (the validation.json counts)."""
        quarantined = [r for r in self.records if not r.accepted]
        per_kind: dict[str, dict[str, int]] = {}
        for record in self.records:
            entry = per_kind.setdefault(record.kind, {"records_in": 0, "accepted": 0, "quarantined": 0})
            entry["records_in"] += 1
            entry["accepted" if record.accepted else "quarantined"] += 1
        return {
            "records_in": len(self.records),
            "accepted": len(self.records) - len(quarantined),  # records_in == accepted + quarantined by construction
            "quarantined": len(quarantined),
            "quarantined_by_reason": dict(sorted(Counter(r.reason for r in quarantined).items())),
            "by_kind": dict(sorted(per_kind.items())),
        }

    def write(self, quarantine_dir: Path, raw_dir: Path) -> Path:
        """Write ``quarantine.jsonl`` and copy the rejected files into ``quarantine_dir/files``."""
        quarantine_dir.mkdir(parents=True, exist_ok=True)
        target = quarantine_dir / "quarantine.jsonl"
        with atomic_file(target) as handle:
            for record in self.records:
                if record.accepted:
                    continue
                copies = []
                for path in record.files:
                    if not path.is_file():
                        continue
                    try:
                        relative = path.relative_to(raw_dir)
                    except ValueError:
                        relative = Path(path.name)
                    destination = quarantine_dir / "files" / relative
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, destination)
                    copies.append(str(Path("files") / relative))
                line = {
                    "kind": record.kind, "record_id": record.record_id, "patient_id": record.patient_id,
                    "source": record.source, "reason": record.reason, "message": record.message,
                    "copies": copies,
                }
                if record.raw_text is not None:
                    line["raw"] = record.raw_text
                handle.write(json.dumps(line) + "\n")
        return target

    def log_warnings(self, limit: int) -> None:
        """One warning per quarantined record (file, record, reason), summarised after ``limit``."""
        quarantined = [r for r in self.records if not r.accepted]
        for record in quarantined[:limit]:
            LOG.warning("quarantined %s %s (%s): %s — %s", record.kind, record.record_id, record.source,
                        record.reason, record.message)
        if len(quarantined) > limit:
            rest = Counter(r.reason for r in quarantined[limit:])
            LOG.warning("... and %d more quarantined records: %s (see quarantine.jsonl)",
                        len(quarantined) - limit, dict(rest))
