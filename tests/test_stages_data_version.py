"""The data version through :mod:`meddiff.stages` (issue 13): ingest hashes the drop it reads, later stages
run under that version (``$MEDDIFF_DATA_VERSION``, hence their MLflow tags) and pass it on in their data
folders, as separate processes (CLI, DVC) do. Stage functions are stand-ins: only the runner is tested."""

from __future__ import annotations

import json
import os
import types
from pathlib import Path
from typing import Any

import pytest

from meddiff import stages
from meddiff.config import Params, apply_overrides, load_params
from meddiff.data.drop import DropNotFoundError, folder_version
from meddiff.stages import DATA_VERSION_ENV, DATA_VERSION_FILE, run_stage, run_versioned

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Stand-in ingest and preprocess functions that record what they got and the environment they ran in."""
    record: dict[str, Any] = {}

    def run_ingest(params: Params, raw_dir: Path, interim_dir: Path, quarantine_dir: Path, report_dir: Path) -> dict:
        record["ingest"] = {"raw_dir": raw_dir, "version": os.environ.get(DATA_VERSION_ENV)}
        for folder in (interim_dir, quarantine_dir, report_dir):
            folder.mkdir(parents=True)
        return {"records_in": sum(1 for p in raw_dir.rglob("*") if p.is_file())}

    def run_preprocess(params: Params, interim_dir: Path, processed_dir: Path, report_dir: Path) -> dict:
        record["preprocess"] = {"version": os.environ.get(DATA_VERSION_ENV)}
        processed_dir.mkdir(parents=True)
        report_dir.mkdir(parents=True)
        return {}

    fakes = {"meddiff.data.ingest": types.SimpleNamespace(run_ingest=run_ingest),
             "meddiff.data.preprocess": types.SimpleNamespace(run_preprocess=run_preprocess)}
    monkeypatch.setattr(stages.importlib, "import_module", lambda name: fakes[name])
    monkeypatch.delenv(DATA_VERSION_ENV, raising=False)
    return record


def folders(root: Path) -> dict[str, Path]:
    return {"interim_dir": root / "interim", "quarantine_dir": root / "quarantine", "report_dir": root / "reports"}


def test_ingest_hashes_its_drop_and_later_stages_run_under_it(seen: dict[str, Any], tmp_path: Path) -> None:
    drop = tmp_path / "drop"
    (drop / "ehr").mkdir(parents=True)
    (drop / "ehr" / "Patient.ndjson").write_text('{"id": "p1"}\n')
    params = load_params(REPO / "params.yaml")

    result, version = run_versioned("ingest", params, uri=str(drop), **folders(tmp_path))

    assert result == {"records_in": 1} and version == folder_version(drop)
    assert seen["ingest"] == {"raw_dir": drop, "version": version}  # read in place, run under its version
    assert json.loads((tmp_path / "interim" / DATA_VERSION_FILE).read_text()) == {"data_version": version}
    assert json.loads((tmp_path / "quarantine" / DATA_VERSION_FILE).read_text()) == {"data_version": version}
    assert not (tmp_path / "reports" / DATA_VERSION_FILE).exists()  # reports are no data folders
    assert DATA_VERSION_ENV not in os.environ  # restored after the stage

    run_stage("preprocess", params, interim_dir=tmp_path / "interim", processed_dir=tmp_path / "processed",
              report_dir=tmp_path / "reports" / "preprocess")
    assert seen["preprocess"] == {"version": version}  # from the interim folder
    assert json.loads((tmp_path / "processed" / DATA_VERSION_FILE).read_text()) == {"data_version": version}


def test_uri_from_params_and_folder_fallback(seen: dict[str, Any], tmp_path: Path) -> None:
    drop, cohort = tmp_path / "drop", tmp_path / "cohort"
    for folder, text in ((drop, "theirs"), (cohort, "ours")):
        folder.mkdir()
        (folder / "notes.txt").write_text(text)
    params = apply_overrides(load_params(REPO / "params.yaml"), [f"ingest.raw_uri={drop}"])

    _, version = run_versioned("ingest", params, raw_dir=cohort, **folders(tmp_path / "a"))
    assert seen["ingest"]["raw_dir"] == drop and version == folder_version(drop)  # ingest.raw_uri wins
    _, version = run_versioned("ingest", params, uri="", raw_dir=cohort, **folders(tmp_path / "b"))
    assert seen["ingest"]["raw_dir"] == cohort and version == folder_version(cohort)  # "" reads the folder

    with pytest.raises(DropNotFoundError, match=r"raw data directory not found; run `meddiff cohort` first"):
        run_stage("ingest", load_params(REPO / "params.yaml"), raw_dir=tmp_path / "none", **folders(tmp_path / "c"))
    with pytest.raises(TypeError, match="reads no URI"):
        run_versioned("preprocess", params, uri=str(drop))
