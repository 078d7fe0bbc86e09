"""A raw drop of new patients made ready for a trained model: ingest and preprocess in *apply* mode.

Shared by :mod:`meddiff.prediction.predict` and :mod:`meddiff.prediction.monitor` (so both see exactly the
same patients) and by external validation (:mod:`meddiff.evaluation.external`): ingest with
``label_required=False`` (a patient without a diagnosis is admitted, a malformed record quarantined with
its reason; external validation requires the diagnosis), then
:func:`meddiff.data.preprocess.run_preprocess_apply` with the model's own ``preprocessing/`` artefacts
(tokenizer, scaler statistics, image parameters; nothing refitted).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from meddiff.config import Params
from meddiff.data.dataset import PREPROCESSING_DIR, ProcessedDataset, load_processed
from meddiff.data.ingest import IngestResult, run_ingest
from meddiff.data.preprocess import run_preprocess_apply

#: the admitted drop's processed arrays inside ``work_dir``
PROCESSED_SUBDIR = "processed"
#: the quarantine ledger copied into a report: each rejected record, its reason and raw location
QUARANTINE_RECORDS_FILE = "quarantine.jsonl"


def admit_drop(
    params: Params, raw_dir: Path, model_dir: Path, work_dir: Path, report_dir: Path, keep_records: bool = True,
    label_required: bool = False,
) -> tuple[IngestResult, ProcessedDataset]:
    """Ingest ``raw_dir`` (a folder or ``s3://`` prefix) and preprocess it with ``model_dir``'s artefacts.

    ``work_dir`` receives ``interim/``, ``quarantine/`` and ``processed/``; ``report_dir`` ingest's
    ``ingest/validation.json`` (counts only) and, with ``keep_records``, :data:`QUARANTINE_RECORDS_FILE`
    (the rejected records with their raw ids and reasons, for the sender to fix; PHI-bearing like
    ``data/quarantine/``, but no copies of raw files). ``label_required``: a patient without a diagnosis is
    quarantined (a labelled drop to evaluate on) instead of admitted (new patients to predict for).

    Raises:
        ValueError: no patient of the drop could be admitted (every record quarantined).
        FileNotFoundError: no raw drop, or the model has no preprocessing artefacts.
    """
    ingest = run_ingest(params, Path(raw_dir), work_dir / "interim", work_dir / "quarantine", report_dir / "ingest",
                        label_required=label_required)
    if keep_records:
        shutil.copyfile(work_dir / "quarantine" / QUARANTINE_RECORDS_FILE, report_dir / QUARANTINE_RECORDS_FILE)
    if ingest.n_patients == 0:
        raise ValueError(f"{raw_dir}: no patient could be admitted ({ingest.quarantined} of {ingest.records_in} "
                         f"records quarantined: {ingest.quarantined_by_reason})")
    run_preprocess_apply(params, work_dir / "interim", Path(model_dir) / PREPROCESSING_DIR,
                         work_dir / PROCESSED_SUBDIR)
    return ingest, load_processed(work_dir / PROCESSED_SUBDIR)
