"""A tiny synthetic cohort, generated, ingested and preprocessed once per test session."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from meddiff.config import Params, params_from_dict
from meddiff.data import s3

#: the integration tests' server launchers (moto, MLflow), loaded by path: tests/ is no package
SERVERS = Path(__file__).resolve().parents[1] / "integration" / "servers.py"


def integration_servers() -> ModuleType:
    """``tests/integration/servers.py`` as a module (loaded once)."""
    name = "meddiff_test_servers"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SERVERS)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture
def moto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A real moto S3 server on 127.0.0.1 with dummy credentials; yields its endpoint URL."""
    servers = integration_servers()
    for key, value in servers.DUMMY_AWS_ENV.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", *s3.ENDPOINT_VARIABLES):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv(s3.STAGING_VARIABLE, str(tmp_path / "staging"))
    with servers.moto_s3(tmp_path / "logs") as server:
        monkeypatch.setenv("MEDDIFF_S3_ENDPOINT_URL", server.url)
        yield server.url


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
