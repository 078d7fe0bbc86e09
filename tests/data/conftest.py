"""A tiny synthetic cohort, generated, ingested and preprocessed once per test session."""

from __future__ import annotations

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
        "preprocess": {
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

    root = tmp_path_factory.mktemp("pipeline")
    paths = Pipeline(tiny_params, raw_cohort, root / "interim", root / "quarantine", root / "reports" / "ingest",
                     root / "processed", root / "reports" / "preprocess")
    run_ingest(tiny_params, paths.raw, paths.interim, paths.quarantine, paths.ingest_report)
    run_preprocess(tiny_params, paths.interim, paths.processed, paths.preprocess_report)
    return paths
