"""Free-text clinical notes: ``notes/<patient>.txt`` or FHIR DocumentReference attachments, UTF-8."""

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


def decode_note(data: bytes) -> tuple[bool, str, str | None]:
    """``(utf8_valid, text, error)``: strict UTF-8 (RFC 3629, a BOM is accepted)."""
    try:
        return True, data.decode("utf-8-sig").strip(), None
    except UnicodeDecodeError as error:
        return False, "", f"byte {error.start}: {error.reason}"


def read_note(path: Path) -> NoteFile:
    """Read a note strictly as UTF-8 (a BOM is accepted); invalid bytes leave ``text`` empty."""
    valid, text, error = decode_note(path.read_bytes())
    return NoteFile(path.stem, path, valid, text, error)


def normalise_note(text: str) -> str:
    """Collapse whitespace: the manifest keeps one line of text per patient."""
    return " ".join(text.split())
