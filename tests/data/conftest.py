"""A tiny synthetic cohort, generated, ingested and preprocessed once per test session."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from meddiff.config import Params, params_from_dict


def tiny_params_dict() -> dict:
    return {
        "seed": 7,
        "cohort": {
            "n_patients": 40,
            "class_prevalence": [0.4, 0.25, 0.2, 0.15],
            "volume_shape": [12, 24, 24],
            "pixel_spacing_mm": 8.0,
            "slice_thickness_mm": 12.0,
            "minority_site_fraction": 0.15,
            "minority_slice_thickness_mm": 16.0,
            "corrupt_fraction": 0.05,
            "num_workers": 2,
        },
        "ingest": {"allow_ephemeral_key_for_synthetic": True},
        "preprocess": {
            "cache_dir": None,
            "spatial_size": [16, 16, 16],
            "pixdim_mm": [12.0, 12.0, 12.0],
            "max_note_tokens": 32,
            "vocab_size": 120,
        },
    }


@dataclass(frozen=True)
class Pipeline:
    params: Params
    raw: Path
    interim: Path
    quarantine: Path
    ingest_report: Path
    processed: Path
    preprocess_report: Path


def pseudonyms(params: Params, raw: Path) -> dict[str, str]:
    """Raw patient id -> the pseudonym ingest gives it (same key resolution as ingest)."""
    import json

    from meddiff.data.deid import Pseudonymizer, resolve_key

    key, _ = resolve_key(params.ingest.deid_key_env, params.ingest.allow_ephemeral_key_for_synthetic, raw)
    pseudo = Pseudonymizer(key, params.ingest.deid_max_date_shift_days)
    ids = [json.loads(line)["id"] for line in (raw / "ehr" / "Patient.ndjson").read_text().splitlines()]
    return {pid: pseudo.pseudonym(pid) for pid in ids}


@pytest.fixture(scope="session")
def pseudonym_of(tiny_params: Params, raw_cohort: Path) -> dict[str, str]:
    return pseudonyms(tiny_params, raw_cohort)


@pytest.fixture(scope="session")
def tiny_params() -> Params:
    return params_from_dict(tiny_params_dict())


@pytest.fixture(scope="session")
def raw_cohort(tiny_params: Params, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from meddiff.data.cohort import generate_cohort

    raw = tmp_path_factory.mktemp("cohort") / "raw"
    generate_cohort(tiny_params, raw)
    return raw


@pytest.fixture(scope="session")
def pipeline(tiny_params: Params, raw_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    from meddiff.data.ingest import run_ingest
    from meddiff.data.preprocess import run_preprocess

    os.environ.pop(tiny_params.ingest.deid_key_env, None)  # the ephemeral (synthetic) key: reproducible
    root = tmp_path_factory.mktemp("pipeline")
    paths = Pipeline(tiny_params, raw_cohort, root / "interim", root / "quarantine", root / "reports" / "ingest",
                     root / "processed", root / "reports" / "preprocess")
    run_ingest(tiny_params, paths.raw, paths.interim, paths.quarantine, paths.ingest_report)
    run_preprocess(tiny_params, paths.interim, paths.processed, paths.preprocess_report)
    return paths
