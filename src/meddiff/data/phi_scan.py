"""Scan outputs for the identifiers of a raw drop: the check that nothing identifying left ``raw/``.

De-identification (:mod:`meddiff.data.deid`) is tested by looking for the drop's own identifiers —
patient ids, names in every spelling a scanner or EHR writes them (``Given Family``, DICOM PN
``Family^Given``), birth dates in three spellings, addresses, phone numbers, institutions and DICOM
UIDs/accession numbers — in every file a pipeline wrote: interim and processed data, models,
reports, MLflow artefacts, Kubeflow artefacts, synthetic data. Files are read whatever their format
(parquet and npz decoded, ``.gz`` unpacked, bytes read as Latin-1 and as UTF-32) so that an identifier
cannot hide in a binary container.

The quarantine folder holds raw records kept for review and is PHI-bearing by design; it is scanned
only when asked.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

#: Shorter strings (e.g. a 4-digit postal code) match too much unrelated text to be evidence.
MIN_IDENTIFIER_CHARS = 5
#: All-digit identifiers shorter than this (5-digit postal codes) collide with measurements and byte
#: counts in headers (a false "13100" was found in a DICOM header); the address lines, names, phones and
#: dates of the same patients are still searched.
MIN_NUMERIC_IDENTIFIER_CHARS = 8
#: DICOM files sampled for their UIDs, institution and accession number (every n-th, at most this many).
DICOM_SAMPLE = 60
DICOM_STRIDE = 12


@dataclass(frozen=True)
class Leak:
    path: Path
    identifiers: tuple[str, ...]


def raw_identifiers(raw_dir: Path) -> list[str]:
    """What must never leave ``raw_dir``: from ``ehr/Patient.ndjson`` (FHIR R4 Patient: id, names,
    address lines, postal codes, telecom values, birth dates) and a sample of the DICOM files
    (Study/Series/SOP Instance UIDs, InstitutionName, AccessionNumber; PS3.15 Annex E Table E.1-1)."""
    import pydicom

    raw_dir = Path(raw_dir)
    found: set[str] = set()
    patients = raw_dir / "ehr" / "Patient.ndjson"
    for line in patients.read_text().splitlines() if patients.is_file() else []:
        patient = json.loads(line)
        found.add(patient["id"])
        for name in patient.get("name", []):
            given = name.get("given") or [""]
            given = [given] if isinstance(given, str) else given
            family = name.get("family") or ""
            family = " ".join(family) if isinstance(family, list) else family
            found.update({f"{given[0]} {family}", f"{family}^{given[0]}", family})
        for address in patient.get("address", []):
            found.update([*address.get("line", []), address.get("postalCode", "")])
        found.update(t["value"] for t in patient.get("telecom", []) if "value" in t)
        born = patient.get("birthDate", "")
        if len(born) == len("1957-07-01"):
            found.update([born, born.replace("-", ""), f"{born[5:7]}/{born[8:10]}/{born[:4]}"])
    for path in sorted((raw_dir / "imaging").rglob("*.dcm"))[: DICOM_SAMPLE : DICOM_STRIDE]:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "InstitutionName",
                        "AccessionNumber"):
            found.add(str(getattr(ds, keyword, "")))
    return sorted(
        s for s in found
        if len(s) >= MIN_IDENTIFIER_CHARS and not (s.isdigit() and len(s) < MIN_NUMERIC_IDENTIFIER_CHARS)
    )


#: Inline images in HTML/SVG reports: base64 text, which spells any short string by chance.
DATA_URI = re.compile(r"data:[\w/+.-]+;base64,[A-Za-z0-9+/=]+")


def readable_text(path: Path) -> str:
    """Every string a file holds, whatever its format (parquet and npz decoded, ``.gz`` unpacked, inline
    base64 images of HTML/SVG left out: an identifier drawn into an image is not text)."""
    path = Path(path)
    with path.open("rb") as handle:
        head = handle.read(256).lstrip().lower()
    # KFP stores an HTML artefact under the bare name of its output (no suffix): sniff the content too
    if path.suffix in {".html", ".htm", ".svg"} or head.startswith((b"<!doctype html", b"<html", b"<svg")):
        return DATA_URI.sub("", path.read_text(encoding="utf-8", errors="replace"))
    if path.suffix == ".parquet":
        return pd.read_parquet(path).to_csv()
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            strings = [npz[k] for k in npz.files if npz[k].dtype.kind == "U"]
            return " ".join(" ".join(a.astype(str).ravel().tolist()) for a in strings)
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return data.decode("latin-1") + data.decode("utf-32-le", errors="ignore")


def find_identifiers(roots: Iterable[Path], identifiers: Iterable[str], skip: Iterable[Path] = ()) -> list[Leak]:
    """Every file of ``roots`` (folders, scanned recursively, or single files) that is not under ``skip``
    and holds one of ``identifiers`` (case-insensitive)."""
    needles = [s.lower() for s in identifiers]
    skipped = [Path(s).resolve() for s in skip]
    leaks = []
    for root in roots:
        root = Path(root)
        for path in [root] if root.is_file() else sorted(root.rglob("*")):
            resolved = path.resolve()
            if not path.is_file() or any(resolved.is_relative_to(s) for s in skipped):
                continue
            text = readable_text(path).lower()
            hits = tuple(s for s in needles if s in text)
            if hits:
                leaks.append(Leak(path, hits))
    return leaks
