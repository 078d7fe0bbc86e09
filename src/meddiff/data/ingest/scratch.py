"""An SQLite database in a temporary folder: where ingest parks what it must keep for the whole drop but
reads back rarely (slice headers until their series is assembled, raw EHR texts until a record is
quarantined), so its memory does not grow with the drop (issue 14)."""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Self


class ScratchDatabase:
    """One SQLite file in a fresh temporary folder, created with ``schema`` (SQL statements); a context
    manager whose exit (or :meth:`close`) removes the folder."""

    def __init__(self, prefix: str, schema: tuple[str, ...]) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix=prefix)
        self._db = sqlite3.connect(Path(self._folder.name) / "scratch.sqlite")
        for statement in schema:
            self._db.execute(statement)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Remove the database and its folder."""
        self._db.close()
        self._folder.cleanup()
