"""The raw tree sorted by the reader that takes each file; unsafe paths and stray files quarantined.

Nothing is opened here. Symlinks (to files or folders, inside or outside the raw tree) are never
followed, names with ``..`` or control characters are refused, and a file outside the raw layout
(``docs/data.md``) is a ``file`` record quarantined as ``unexpected_file``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from meddiff.data import ehr_csv
from meddiff.data.ingest.ehr import EHR_RESOURCES
from meddiff.data.nifti import is_nifti
from meddiff.data.quarantine import Ledger

#: files at the top of raw_dir that describe the drop rather than hold records
PROVENANCE_FILES = frozenset({"cohort.json", "README.md", "README.txt"})
#: characters never accepted in a raw file or folder name (path tricks, control characters)
_UNSAFE_NAME = re.compile(r"\.\.|[\\\x00-\x1f\x7f]")
#: path depth (parts below raw_dir) of a file directly in a top-level folder: ``ehr/Patient.ndjson``
_TOP_FOLDER_FILE = 2
#: path depth of one file of a BraTS case: ``imaging/<case>/<case>_t1.nii.gz``
_NIFTI_CASE_FILE = 3


@dataclass
class Inventory:
    """The raw tree sorted by what reads it (paths only: nothing is opened here).

    DICOM files, the one list as long as the drop's slices, are kept as path strings (a ``Path`` per file
    took about four times the memory: issue 14, flat ingest memory).
    """

    dicom: list[str] = field(default_factory=list)
    nifti_cases: dict[str, list[Path]] = field(default_factory=dict)
    masks: list[Path] = field(default_factory=list)
    ndjson: list[Path] = field(default_factory=list)
    bundles: list[Path] = field(default_factory=list)
    csv: list[Path] = field(default_factory=list)
    notes: list[Path] = field(default_factory=list)

    def take(self, path: Path, relative: Path) -> bool:
        """File ``path`` (``relative`` to raw_dir) under its reader; ``False`` if no reader takes it."""
        top, depth, name = relative.parts[0], len(relative.parts), path.name
        if top == "imaging" and is_nifti(path) and depth == _NIFTI_CASE_FILE:
            self.nifti_cases.setdefault(relative.parts[1], []).append(path)
        elif top == "imaging" and not is_nifti(path):
            self.dicom.append(str(path))
        elif top == "masks" and name.endswith(".nii.gz") and depth == _TOP_FOLDER_FILE:
            self.masks.append(path)
        elif top == "ehr" and depth == _TOP_FOLDER_FILE and path.suffix == ".ndjson" and path.stem in EHR_RESOURCES:
            self.ndjson.append(path)
        elif top == "ehr" and depth == _TOP_FOLDER_FILE and path.suffix == ".json":
            self.bundles.append(path)
        elif top == "ehr" and depth == _TOP_FOLDER_FILE and name in ehr_csv.MIMIC_TABLES:
            self.csv.append(path)
        elif top == "notes" and path.suffix == ".txt" and depth == _TOP_FOLDER_FILE:
            self.notes.append(path)
        else:
            return False
        return True


def _inside(root: str, path: Path) -> bool:
    return os.path.commonpath([root, os.path.realpath(path)]) == root


def _unsafe_directory(path: Path, root: str) -> str | None:
    """Why the folder ``path`` is not walked into, or ``None`` for a plain folder with a safe name."""
    if not (path.is_symlink() or _UNSAFE_NAME.search(path.name)):
        return None
    where = "inside" if _inside(root, path) else "outside"
    return (f"{'symlinked' if path.is_symlink() else 'unsafe'} directory "
            f"(resolves {where} the raw directory) is not followed")


def _unsafe_file(path: Path, root: str) -> str | None:
    """Why the file ``path`` is not read, or ``None`` for a regular file with a safe name."""
    if path.is_symlink():
        if not os.path.exists(os.path.realpath(path)):
            what = "to nothing (dangling)"
        else:
            what = "inside the raw directory" if _inside(root, path) else "outside the raw directory"
        return f"symlink pointing {what}; symlinks are never followed"
    if _UNSAFE_NAME.search(path.name):
        return f"file name {path.name!r} contains '..' or control characters"
    if not path.is_file():
        return "not a regular file (device, FIFO or socket)"
    return None


def take_inventory(raw_dir: Path, ledger: Ledger) -> Inventory:
    """Walk ``raw_dir`` without following symlinks; sort files by reader, quarantine the rest.

    Unsafe paths become ``file`` records quarantined as ``unsafe_path`` (never copied: a copy would
    follow the link), files outside the layout ``unexpected_file``; provenance files are skipped.
    """
    found = Inventory()
    root = os.path.realpath(raw_dir)
    for dirpath, dirnames, filenames in os.walk(raw_dir, followlinks=False):
        directory = Path(dirpath)
        for name in sorted(dirnames):
            problem = _unsafe_directory(directory / name, root)
            if problem is not None:
                ledger.quarantine(ledger.add_file(directory / name, raw_dir, keep_copy=False), "unsafe_path", problem)
                dirnames.remove(name)
        dirnames.sort()
        for name in sorted(filenames):
            path = directory / name
            relative = path.relative_to(raw_dir)
            problem = _unsafe_file(path, root)
            if problem is not None:
                ledger.quarantine(ledger.add_file(path, raw_dir, keep_copy=False), "unsafe_path", problem)
            elif len(relative.parts) == 1 and name in PROVENANCE_FILES:
                continue
            elif not found.take(path, relative):
                ledger.quarantine(ledger.add_file(path, raw_dir), "unexpected_file", f"{relative} is not part of the "
                                  "raw layout (imaging/, masks/, ehr/<Resource>.ndjson|*.json|<table>.csv, "
                                  "notes/<patient>.txt)")
    return found
