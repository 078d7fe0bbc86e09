"""Imaging -> one ``image_series`` record per DICOM series or BraTS case, written to interim as NIfTI.

DICOM files are read in a pool of forked workers (headers in chunks, then one series per task,
:mod:`meddiff.data.dicom`). The slice headers go to an on-disk table (:class:`HeaderStore`), series are
assembled from it a round at a time and each worker writes its series' de-identified header itself, so
what ingest holds per file or per series does not grow with the drop (issue 14, flat ingest memory).
A series must have one PatientID, one StudyInstanceUID and a modality of ``ingest.accepted_modalities``
(CT and MR by default); a truncated file is its series' reason before any other. Nothing a worker meets
in one series (a bad header value, a decoder error) stops the stage: it quarantines that series with the
error. Assembled volumes are written as NIfTI-1 (RAS, mm) under a pseudonymous UID and their reference
header is de-identified (DICOM PS3.15 Annex E Basic Profile, :mod:`meddiff.data.deid`). BraTS cases
(:mod:`meddiff.data.nifti`) give one channel as the image and the segmentation as its mask.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.pool import Pool
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from meddiff.data.deid import Pseudonymizer, deidentify_dataset, person_names
from meddiff.data.dicom import (
    FileProblem,
    SeriesError,
    SliceHeader,
    load_series,
    read_headers,
    series_file_problem,
)
from meddiff.data.ingest.scratch import ScratchDatabase
from meddiff.data.nifti import CaseError, load_brats_case
from meddiff.data.quarantine import Ledger, Record
from meddiff.data.validation import RECORD_ID
from meddiff.io import write_json

#: the modality whose intensities are Hounsfield units (checked by the series suite)
CT = "CT"
#: BraTS cases are MR (co-registered MR channels)
MR = "MR"
#: columns of the image series table (one row per assembled series or case; ``affine``: a 4x4 float64 array)
SERIES_COLUMNS = [RECORD_ID, "patient_id", "series_uid", "modality", "n_slices", "hu_min", "hu_max", "shape",
                  "affine", "spacing_mm", "header_file", "mask_file"]
#: a 3x3 whose columns are this close to orthogonal (cosine) is a rotation with zooms: qform can hold it
ORTHOGONAL_ATOL = 1e-6
#: the columns the image series suite validates (:func:`meddiff.data.validation.series_rules`)
SERIES_VALIDATED_COLUMNS = [RECORD_ID, "patient_id", "series_uid", "n_slices", "hu_min", "hu_max"]
#: files per header-reading task (amortises the worker round trip)
HEADER_CHUNK_FILES = 64
#: DICOM elements larger than this are left out of the kept JSON header (pixel data, overlays)
HEADER_BULK_DATA_BYTES = 4096
#: series handed to the worker pool at a time: bounds the slice headers and results held in memory
SERIES_PER_ROUND = 128
#: record ids of DICOM series: this prefix and the SeriesInstanceUID
SERIES_RECORD_PREFIX = "series/"


def is_orthogonal(affine: np.ndarray) -> bool:
    """Whether the voxel axes of ``affine`` are perpendicular (no shear): what a NIfTI qform can encode."""
    columns = np.asarray(affine, dtype=float)[:3, :3]
    unit = columns / np.linalg.norm(columns, axis=0)
    return bool(np.allclose(unit.T @ unit, np.eye(3), atol=ORTHOGONAL_ATOL))


def save_nifti(data: np.ndarray, affine: np.ndarray, target: Path) -> None:
    """A fresh NIfTI-1 header (nothing copied from the source's descrip/aux_file/db_name).

    sform holds ``affine``; qform holds it too when it has no shear, else qform_code is 0 (a qform is a
    rotation with zooms: a sheared affine would give qform readers another geometry).
    """
    image = nib.Nifti1Image(data, affine)
    if is_orthogonal(affine):
        image.set_qform(affine, code=1)
    else:
        image.set_qform(None, code=0)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    nib.save(image, target)


def interim_image_name(pseudo: Pseudonymizer, series_uid: str) -> str:
    """The interim file name of an assembled series: its pseudonymous UID (no raw UID in any interim name)."""
    return f"{pseudo.uid(series_uid)}.nii.gz"


def interim_header_name(pseudo: Pseudonymizer, series_uid: str) -> str:
    """The interim file name of a series' de-identified header until its patient is known (then
    ``<pseudonym>.json``, :func:`meddiff.data.ingest.manifest.place_image`)."""
    return f"{pseudo.uid(series_uid)}.json"


@dataclass(frozen=True)
class PackedHeader:
    """A slice header as a worker hands it over: the fields grouping needs, and the pickled
    :class:`~meddiff.data.dicom.SliceHeader` (the parent stores it without unpickling and pickling it again)."""

    series_instance_uid: str
    patient_id: str
    names: tuple[str, ...]
    data: bytes

    @classmethod
    def of(cls, header: SliceHeader) -> PackedHeader:
        return cls(header.series_instance_uid, header.patient_id, header.names,
                   pickle.dumps(header, protocol=pickle.HIGHEST_PROTOCOL))


class HeaderStore(ScratchDatabase):
    """The slice headers of one DICOM scan in an SQLite table in a temporary folder, by series.

    Grouping files into series needs every header before any series can be assembled; holding one
    :class:`~meddiff.data.dicom.SliceHeader` per file (and its path in the series record) made ingest's
    memory grow with the drop (issue 14: 3.4x the peak for 10x the patients). Here a header is a pickled
    row until its series is assembled; a series record gets its files (what the quarantine copies)
    only when the ledger is written (:meth:`attach_files`). Use as a context manager (the folder is
    removed on exit).
    """

    def __init__(self) -> None:
        super().__init__("meddiff-dicom-headers-", (
            "CREATE TABLE header (series INTEGER NOT NULL, data BLOB NOT NULL)",
            "CREATE INDEX header_series ON header (series)"))
        self._series: dict[str, int] = {}  # SeriesInstanceUID -> its key in the table

    def add(self, headers: Iterable[PackedHeader]) -> None:
        """Store slice headers (any series, any order)."""
        rows = [(self._series.setdefault(h.series_instance_uid, len(self._series)), h.data) for h in headers]
        self._db.executemany("INSERT INTO header VALUES (?, ?)", rows)

    def series_uids(self) -> list[str]:
        """Every SeriesInstanceUID seen, sorted."""
        return sorted(self._series)

    def members(self, series_uid: str) -> list[SliceHeader]:
        """The slice headers of one series, sorted by file path and frame (``KeyError`` for an unknown UID)."""
        cursor = self._db.execute("SELECT data FROM header WHERE series = ?", (self._series[series_uid],))
        members = [pickle.loads(data) for (data,) in cursor]
        members.sort(key=lambda h: (str(h.path), h.frame or 0))
        return members

    def files(self, series_uid: str) -> tuple[Path, ...]:
        """The files of one series, sorted, each once (a multi-frame file holds several headers)."""
        return tuple(dict.fromkeys(h.path for h in self.members(series_uid)))

    def attach_files(self, ledger: Ledger) -> None:
        """Give each quarantined DICOM series record of ``ledger`` its files (copied by ``Ledger.write``)."""
        for record in ledger.of_kind("image_series", accepted=False):
            series_uid = record.record_id.removeprefix(SERIES_RECORD_PREFIX)
            if record.record_id.startswith(SERIES_RECORD_PREFIX) and series_uid in self._series:
                record.files = self.files(series_uid)


@dataclass(frozen=True)
class SeriesTask:
    """One series for a worker: its slices, where its NIfTI and its de-identified header go and the key to
    de-identify the header."""

    series_uid: str
    headers: list[SliceHeader]
    target: Path
    header_target: Path
    key: bytes
    max_date_shift_days: int


def _assemble_series(task: SeriesTask) -> dict[str, Any]:
    """Worker: load one series, write it as NIfTI (RAS); de-identify its header; return a row or the error.

    Any error in this one series (a value pydicom cannot convert, a decoder failure) is returned as the
    series' quarantine reason, never raised: one bad file does not stop the stage.
    """
    try:
        return _assembled(task)
    except SeriesError as error:
        return {"series_uid": task.series_uid, "error": (error.reason, error.message)}
    except Exception as error:  # pydicom/decoders raise many types on one odd file: it is that series' problem
        return {"series_uid": task.series_uid,
                "error": ("unreadable_dicom", f"cannot assemble the series: {type(error).__name__}: {error}")}


def _assembled(task: SeriesTask) -> dict[str, Any]:
    volume = load_series(task.headers)
    modality = task.headers[0].modality
    header_file = None
    if volume.reference is not None:
        reference = volume.reference
        names = person_names(reference)
        deidentify_dataset(reference, Pseudonymizer(task.key, task.max_date_shift_days),
                           str(reference.get("PatientID", "") or ""), names)
        write_json(task.header_target, reference.to_json_dict(bulk_data_threshold=HEADER_BULK_DATA_BYTES,
                                                              bulk_data_element_handler=lambda _: ""))
        header_file = task.header_target.name
    save_nifti(volume.hu.astype(np.float32), volume.affine, task.target)
    is_ct = modality == CT
    return {
        "series_uid": task.series_uid, "error": None, "modality": modality, "n_slices": int(volume.hu.shape[2]),
        "hu_min": float(volume.hu.min()) if is_ct else None, "hu_max": float(volume.hu.max()) if is_ct else None,
        "shape": list(volume.hu.shape), "affine": np.asarray(volume.affine, dtype=np.float64),
        "spacing_mm": [float(s) for s in volume.spacing_mm], "header_file": header_file,
    }


def _map(pool: Pool | None, function: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
    """``function`` over ``items`` in order: in the pool's workers, or in this process when there is none."""
    return pool.imap(function, items) if pool is not None else map(function, items)


def path_order(path: str) -> str:
    """Sort key of a path string that orders as ``Path`` objects do (by their parts: ``a/x`` before ``a-b/x``):
    the separator becomes NUL, which sorts below every character a file name can hold."""
    return path.replace(os.sep, "\0")


def _read_chunk(paths: list[str]) -> list[PackedHeader | FileProblem]:
    """Worker: the headers of a chunk of files given as path strings, packed for the store."""
    return [item if isinstance(item, FileProblem) else PackedHeader.of(item)
            for item in read_headers(Path(path) for path in paths)]


def _scan_headers(
    raw_dir: Path, files: list[str], ledger: Ledger, pool: Pool | None, store: HeaderStore,
) -> dict[str, tuple[str, ...]]:
    """Slice headers of ``files`` (sorted) into ``store`` (an unreadable file is a quarantined ``file``
    record); returns the person names of every readable header by PatientID, rejected files included (to
    scrub notes)."""
    chunks = (files[i : i + HEADER_CHUNK_FILES] for i in range(0, len(files), HEADER_CHUNK_FILES))
    names: dict[str, dict[str, None]] = defaultdict(dict)
    for batch in _map(pool, _read_chunk, chunks):
        for item in batch:
            if item.patient_id:
                names[item.patient_id].update(dict.fromkeys(item.names))
            if isinstance(item, FileProblem):
                ledger.quarantine(ledger.add_file(item.path, raw_dir), item.reason, item.message)
        store.add(item for item in batch if not isinstance(item, FileProblem))
    return {patient: tuple(found) for patient, found in names.items()}


def _series_problem(members: list[SliceHeader], accepted_modalities: tuple[str, ...]) -> tuple[str, str] | None:
    """Why a series is not assembled (reason, message), or ``None``; a truncated file wins over the rest."""
    truncated = series_file_problem(members)
    if truncated is not None:
        return truncated
    patient_ids = {h.patient_id for h in members}
    studies = {h.study_instance_uid for h in members}
    modalities = sorted({h.modality for h in members})
    if len(patient_ids) > 1:
        return "inconsistent_patient", f"series mixes {len(patient_ids)} PatientIDs"
    if len(studies) > 1:
        return "inconsistent_study", f"series spans {len(studies)} StudyInstanceUIDs"
    if len(modalities) > 1:
        return "inconsistent_modality", f"series mixes Modality {modalities}"
    if not set(modalities) <= set(accepted_modalities):
        return "unsupported_modality", (f"Modality {modalities}, expected one of {list(accepted_modalities)} "
                                        "(ingest.accepted_modalities)")
    return None


def _assemble_round(pool: Pool | None, tasks: list[SeriesTask], records: dict[str, Record], ledger: Ledger,
                    rows: list[dict[str, Any]]) -> None:
    """Assemble ``tasks`` (in the pool); append a series row to ``rows`` or quarantine the series."""
    for outcome in _map(pool, _assemble_series, tasks):
        record = records[outcome["series_uid"]]
        if outcome["error"] is not None:
            ledger.quarantine(record, *outcome["error"])
            continue
        rows.append({RECORD_ID: record.record_id, "patient_id": record.patient_id, "mask_file": None,
                     **{k: v for k, v in outcome.items() if k != "error"}})


def ingest_dicom(
    raw_dir: Path, files: Sequence[str | Path], images_dir: Path, ledger: Ledger, workers: int, pseudo: Pseudonymizer,
    accepted_modalities: tuple[str, ...] = (CT, MR), keep_patient: Callable[[str | None], bool] | None = None,
    *, headers_dir: Path, store: HeaderStore,
) -> tuple[list[dict[str, Any]], dict[str, Record], dict[str, tuple[str, ...]]]:
    """DICOM files -> series rows (``SERIES_COLUMNS``), records by SeriesInstanceUID and the person names
    of every readable header by PatientID (accepted or not: they are scrubbed from that patient's notes).
    Files are read in path order (:func:`path_order`).

    Assembled series are written to ``images_dir`` as ``<pseudonymous UID>.nii.gz`` and their de-identified
    headers to ``headers_dir`` as ``<pseudonymous UID>.json`` (the row's ``header_file``); ``workers > 1``
    reads and assembles in that many forked processes. The slice headers are kept in ``store``; a series
    record's ``files`` stay empty until :meth:`HeaderStore.attach_files` (call it before writing the
    ledger, while ``store`` is open). ``keep_patient`` (sharded ingest, :mod:`meddiff.data.ingest.shard`):
    a series whose patient (its smallest PatientID, ``None`` without one) it rejects gets no record and
    is not assembled; every header is still read.
    """
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        names = _scan_headers(raw_dir, sorted(map(str, files), key=path_order), ledger, pool, store)
        records: dict[str, Record] = {}
        rows: list[dict[str, Any]] = []
        tasks: list[SeriesTask] = []
        for series_uid in store.series_uids():
            members = store.members(series_uid)
            patient_id = min(h.patient_id for h in members) or None
            if keep_patient is not None and not keep_patient(patient_id):
                continue
            record = ledger.add(Record("image_series", f"{SERIES_RECORD_PREFIX}{series_uid}",
                                       str(members[0].path.parent.relative_to(raw_dir)), patient_id=patient_id))
            records[series_uid] = record
            problem = _series_problem(members, accepted_modalities)
            if problem is not None:
                ledger.quarantine(record, *problem)
                continue
            tasks.append(SeriesTask(series_uid, members, images_dir / interim_image_name(pseudo, series_uid),
                                    headers_dir / interim_header_name(pseudo, series_uid), pseudo.key,
                                    pseudo.max_date_shift_days))
            if len(tasks) == SERIES_PER_ROUND:
                _assemble_round(pool, tasks, records, ledger, rows)
                tasks = []
        _assemble_round(pool, tasks, records, ledger, rows)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return rows, records, names


def keep_preferred_modality(series: pd.DataFrame, accepted_modalities: tuple[str, ...],
                            ledger: Ledger) -> pd.DataFrame:
    """One modality per patient: of a patient's assembled series, those of the first modality listed in
    ``accepted_modalities`` stay; the others are quarantined as ``multiple_series`` (one image per patient).
    Series of one modality are left to the series suite (several CT series of a patient are ambiguous)."""
    if series.empty:
        return series
    rank = {modality: i for i, modality in enumerate(accepted_modalities)}
    order = series["modality"].map(lambda m: rank.get(m, len(rank)))
    best = order.groupby(series["patient_id"], dropna=False).transform("min")
    dropped = series[order > best]
    for record_id, patient_id, modality in dropped[[RECORD_ID, "patient_id", "modality"]].itertuples(index=False):
        preferred = accepted_modalities[int(best[series[RECORD_ID] == record_id].iloc[0])]
        ledger.quarantine(ledger.get("image_series", record_id), "multiple_series",
                          f"patient {patient_id} has a {preferred} series, which ingest.accepted_modalities lists "
                          f"before {modality}: this {modality} series is not used (one image per patient)")
    return series[order <= best].reset_index(drop=True)


def ingest_nifti(
    raw_dir: Path, cases: dict[str, list[Path]], images_dir: Path, ledger: Ledger, channel: str,
    pseudo: Pseudonymizer,
) -> tuple[list[dict[str, Any]], dict[str, Record]]:
    """BraTS cases -> image rows (the chosen channel) with their segmentation as the lesion mask.

    Rows and records are keyed by record id (``nifti/<case>``); MR intensities are not HU, so
    ``hu_min``/``hu_max`` stay empty.
    """
    rows, records = [], {}
    for case_id, files in sorted(cases.items()):
        source = str(files[0].parent.relative_to(raw_dir))
        record = ledger.add(Record("image_series", f"nifti/{case_id}", source, patient_id=case_id,
                                   files=tuple(sorted(files))))
        records[record.record_id] = record
        try:
            case = load_brats_case(case_id, files, channel)
        except CaseError as error:
            ledger.quarantine(record, error.reason, error.message)
            continue
        series_uid = f"nifti:{case_id}"
        save_nifti(case.image, case.affine, images_dir / interim_image_name(pseudo, series_uid))
        mask_file = f"{pseudo.uid(series_uid)}.mask.nii.gz"
        save_nifti(case.mask, case.affine, images_dir / mask_file)
        rows.append({RECORD_ID: record.record_id, "patient_id": case_id, "series_uid": series_uid, "modality": MR,
                     "n_slices": int(case.image.shape[2]), "hu_min": None, "hu_max": None,
                     "shape": list(case.image.shape), "affine": np.asarray(case.affine, dtype=np.float64),
                     "spacing_mm": [float(v) for v in nib.affines.voxel_sizes(case.affine)],
                     "header_file": None, "mask_file": mask_file})
    return rows, records
