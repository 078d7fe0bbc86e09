"""The ``ingest`` stage: inventory -> imaging -> EHR -> validated tables -> manifest -> quarantine + report."""

from __future__ import annotations

import datetime
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from meddiff.config import Params
from meddiff.data.deid import Pseudonymizer, resolve_key
from meddiff.data.ingest.ehr import RawTexts, read_ehr
from meddiff.data.ingest.imaging import (
    SERIES_COLUMNS,
    SERIES_VALIDATED_COLUMNS,
    HeaderStore,
    ingest_dicom,
    ingest_nifti,
    keep_preferred_modality,
)
from meddiff.data.ingest.inventory import Inventory, take_inventory
from meddiff.data.ingest.manifest import (
    MANIFEST_FILE,
    InterimLayout,
    ManifestContext,
    ManifestInputs,
    assemble_manifest,
)
from meddiff.data.ingest.notes import note_table
from meddiff.data.ingest.report import validation_report, write_report
from meddiff.data.ingest.shard import Shard, shard_frame, shard_ledger, write_shard_marker
from meddiff.data.ingest.tables import EhrRows, TableSpec, validate_tables, with_lab_columns
from meddiff.data.quarantine import Ledger
from meddiff.data.validation import condition_rules, note_rules, observation_rules, patient_rules, series_rules
from meddiff.io import atomic_dir

LOG = logging.getLogger(__name__)

#: ``ingest.num_workers: 0`` means one worker per core, at most this many (DICOM decoding is memory-bound)
MAX_AUTO_WORKERS = 8


@dataclass
class IngestResult:
    """Summary of ``meddiff ingest``: where the manifest is and the ledger's counts (``seconds``: wall clock)."""

    interim_dir: Path
    manifest: Path
    n_patients: int
    records_in: int
    accepted: int
    quarantined: int
    quarantined_by_reason: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def _worker_count(configured: int) -> int:
    return configured if configured > 0 else max(1, min(os.cpu_count() or 1, MAX_AUTO_WORKERS))


def _read_imaging(params: Params, raw_dir: Path, found: Inventory, layout: InterimLayout, ledger: Ledger,
                  pseudo: Pseudonymizer, shard: Shard | None,
                  store: HeaderStore) -> tuple[pd.DataFrame, dict[str, tuple[str, ...]]]:
    """DICOM series and BraTS cases (of ``shard``'s patients only, when given) -> the image series table
    (``SERIES_COLUMNS``; NIfTI written to ``layout.images``, DICOM headers to ``layout.headers``) and the
    person names of every readable DICOM header by PatientID; the slice headers stay in ``store``."""
    started = time.perf_counter()
    config = params.ingest
    dicom_rows, dicom_records, dicom_names = ingest_dicom(raw_dir, found.dicom, layout.images, ledger,
                                                          _worker_count(config.num_workers), pseudo,
                                                          tuple(config.accepted_modalities),
                                                          keep_patient=shard.owns if shard is not None else None,
                                                          headers_dir=layout.headers, store=store)
    cases = {case: files for case, files in found.nifti_cases.items() if shard is None or shard.owns(case)}
    nifti_rows, nifti_records = ingest_nifti(raw_dir, cases, layout.images, ledger, config.brats_channel, pseudo)
    LOG.info("ingest: %d DICOM files -> %d series, %d NIfTI cases (%.1f s)", len(found.dicom),
             len(dicom_records), len(nifti_records), time.perf_counter() - started)
    series = pd.DataFrame(dicom_rows + nifti_rows, columns=SERIES_COLUMNS)
    return keep_preferred_modality(series, tuple(config.accepted_modalities), ledger), dicom_names


def run_ingest(
    params: Params, raw_dir: Path, interim_dir: Path, quarantine_dir: Path, report_dir: Path, *,
    label_required: bool = True, shard: str | Shard | None = None,
) -> IngestResult:
    """Read, validate, quarantine and de-identify the raw drop; write the interim manifest, images, masks.

    ``label_required=False`` is *apply mode* (a drop of new patients to predict for): a patient without a
    diagnosis Condition is admitted with an unknown label instead of being quarantined as
    ``missing_label``; every other check, and ``records_in == accepted + quarantined``, stay the same.

    ``raw_dir`` may be ``s3://bucket/prefix`` (staged locally first). Raises ``FileNotFoundError`` when
    there is no raw directory and
    :class:`meddiff.data.deid.DeidKeyError` when no usable de-identification key is available.
    All three output folders are written atomically.

    ``shard`` (``"i/n"`` or a :class:`~meddiff.data.ingest.shard.Shard`; ``None``/"" = the whole drop) ingests
    only the records of shard ``i`` of ``n`` (:mod:`meddiff.data.ingest.shard`) and marks the three folders
    with its :data:`~meddiff.data.ingest.shard.SHARD_FILE`; :func:`~meddiff.data.ingest.shard.merge_ingest`
    combines the ``n`` shards into the output of one unsharded run.
    """
    selected = Shard.parse(shard) if isinstance(shard, str) and shard else shard or None
    started = time.perf_counter()
    from meddiff.data.s3 import stage_raw_dir  # s3://bucket/prefix: download to a local staging folder

    raw_dir = stage_raw_dir(raw_dir)
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"{raw_dir}: raw data directory not found; run `meddiff cohort` first")
    config = params.ingest
    dataset = params.dataset
    key, key_source = resolve_key(config.deid_key_env, config.allow_ephemeral_key_for_synthetic, raw_dir)
    pseudo = Pseudonymizer(key, config.deid_max_date_shift_days)
    LOG.info("ingest: de-identification key %s", key_source)
    reference_date = datetime.date.fromisoformat(config.reference_date)
    ledger = Ledger()
    found = take_inventory(raw_dir, ledger)

    with (
        atomic_dir(interim_dir) as interim,
        atomic_dir(quarantine_dir) as quarantine,
        atomic_dir(report_dir) as report,
        HeaderStore() as slice_headers,
        RawTexts() as raw_texts,
    ):
        layout = InterimLayout(interim)
        for directory in (layout.images, layout.masks, layout.headers):
            directory.mkdir()
        # imaging first: worker processes fork before great-expectations is imported
        series, dicom_names = _read_imaging(params, raw_dir, found, layout, ledger, pseudo, selected, slice_headers)
        found.dicom = []  # one path per slice, read: not held through the rest of the stage
        ehr_rows = EhrRows.for_ingest(ledger, config, dataset, reference_date)
        # only the count of Bundle entries not read is kept of the reader (not its duplicate hashes)
        ignored_entries = read_ehr(found.ndjson, found.bundles, found.csv, raw_dir, ledger,
                                   ehr_rows.keep, raw_texts).ignored_entries
        if selected is not None and not selected.owns(None):
            ignored_entries.clear()  # Bundle entries ingest does not read: counted by the unassigned shard
        tables = (
            TableSpec("patient", ehr_rows.table("patient"), patient_rules(config.age_range)),
            TableSpec("observation", with_lab_columns(ehr_rows.table("observation"), dataset),
                      observation_rules(dataset.feature_ranges, dataset.feature_units)),
            TableSpec("condition", ehr_rows.table("condition"), condition_rules(dataset.class_names)),
            TableSpec("note", note_table(found.notes, ehr_rows.documents, raw_dir, ledger),
                      note_rules(config.min_note_chars)),
            TableSpec("image_series", series[SERIES_VALIDATED_COLUMNS], series_rules()),
        )
        ehr_rows.documents.clear()  # the notes are in their table now
        if selected is not None:  # every record now knows its patient: keep the shard's
            ledger = shard_ledger(ledger, selected)
            tables = tuple(TableSpec(s.kind, shard_frame(s.frame, s.kind, ledger), s.rules) for s in tables)
            series = shard_frame(series, "image_series", ledger)
            found.masks = [path for path in found.masks if selected.owns(path.name.removesuffix(".nii.gz"))]
        validations = validate_tables(tables, ledger)

        frames = {spec.kind: spec.frame for spec in tables}
        manifest = assemble_manifest(
            ManifestInputs(patients=frames["patient"], observations=frames["observation"],
                           conditions=frames["condition"], notes=frames["note"], series=series,
                           identifiers=ehr_rows.identifiers, mask_paths=found.masks,
                           dicom_names=dicom_names),
            ManifestContext(ledger, pseudo, layout, raw_dir, dataset.feature_names, config.deid_max_age,
                            label_required),
        )
        manifest.to_parquet(interim / MANIFEST_FILE, index=False)

        summary = ledger.summary()
        slice_headers.attach_files(ledger)
        raw_texts.attach(ledger)
        ledger.write(quarantine, raw_dir)
        ledger.log_warnings(config.max_logged_warnings)
        write_report(report, validation_report(summary, manifest, ignored_entries, key_source, validations),
                     validations)
        if selected is not None:
            write_shard_marker((interim, quarantine, report), selected)

    seconds = time.perf_counter() - started
    LOG.info("ingest: %d records, %d accepted, %d quarantined; %d patients in the manifest (%.1f s)",
             summary["records_in"], summary["accepted"], summary["quarantined"], len(manifest), seconds)
    return IngestResult(
        interim_dir=Path(interim_dir), manifest=Path(interim_dir) / MANIFEST_FILE, n_patients=len(manifest),
        records_in=summary["records_in"], accepted=summary["accepted"], quarantined=summary["quarantined"],
        quarantined_by_reason=summary["quarantined_by_reason"], seconds=round(seconds, 2),
    )
