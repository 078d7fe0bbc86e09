"""Free-text clinical notes: one UTF-8 text file per patient, ``notes/<patient>.txt``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class NoteFile:
    """A note as read from disk: whether it decoded as UTF-8 (RFC 3629) and its text."""

    patient_id: str
    path: Path
    utf8_valid: bool
    text: str
    error: str | None = None


def read_note(path: Path) -> NoteFile:
    """Read a note strictly as UTF-8 (a BOM is accepted); invalid bytes leave ``text`` empty."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        return NoteFile(path.stem, path, False, "", f"byte {error.start}: {error.reason}")
    return NoteFile(path.stem, path, True, text.strip())


def normalise_note(text: str) -> str:
    """Collapse whitespace: the manifest keeps one line of text per patient."""
    return " ".join(text.split())
