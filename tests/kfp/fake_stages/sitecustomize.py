"""Stand-in stage functions for testing the KFP shell alone (``test_local_run.py``).

Python imports ``sitecustomize`` at start-up from ``sys.path``; with this folder on ``PYTHONPATH`` every
``kfp.local`` subprocess therefore runs these functions instead of the library's stages. They honour
the stages' path contract (read the input folders, create the output folders, write the files later
stages and the components read: ``validation.json``, ``metrics.json``) and nothing else, so the test
checks how params and artifacts flow through the pipeline, not what the stages compute.
"""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path
from typing import Any

from meddiff.config import Params
from meddiff.stage_table import PIPELINE_STAGES, STAGES


def _read(directory: Path, name: str) -> dict[str, Any]:
    path = Path(directory) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the upstream fake stage did not write it")
    return json.loads(path.read_text())


def _write(directory: Path, name: str, payload: dict[str, Any]) -> None:
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / name).write_text(json.dumps(payload))


def generate_cohort(params: Params, raw_dir: Path) -> dict[str, Any]:
    _write(raw_dir, "cohort.json", {"n_patients": params.cohort.n_patients, "seed": params.seed})
    return {"n_patients": params.cohort.n_patients, "raw_dir": str(raw_dir)}


def run_ingest(
    params: Params, raw_dir: Path, interim_dir: Path, quarantine_dir: Path, report_dir: Path
) -> dict[str, Any]:
    n = _read(raw_dir, "cohort.json")["n_patients"]
    _write(interim_dir, "manifest.json", {"patients": n - 1})
    _write(quarantine_dir, "reasons.json", {"corrupt_dicom": 1})
    validation = {"records_in": n, "accepted": n - 1, "quarantined": 1, "reasons": {"corrupt_dicom": 1}}
    _write(report_dir, "validation.json", validation)
    return validation


def run_preprocess(params: Params, interim_dir: Path, processed_dir: Path, report_dir: Path) -> dict[str, Any]:
    patients = _read(interim_dir, "manifest.json")["patients"]
    _write(processed_dir, "meta.json", {"patients": patients, "spatial_size": params.preprocess.spatial_size})
    _write(report_dir, "data_card.json", {"patients": patients})
    return {"patients": patients}


def run_train(params: Params, processed_dir: Path, model_dir: Path) -> dict[str, Any]:
    patients = _read(processed_dir, "meta.json")["patients"]
    run = {
        "epochs": params.train.epochs,
        "patients": patients,
        "tracking_uri": os.environ.get("MLFLOW_TRACKING_URI"),
        "data_version": os.environ.get("MEDDIFF_DATA_VERSION"),
    }
    _write(model_dir, "run.json", run)
    return run


def run_evaluate(params: Params, processed_dir: Path, model_dir: Path, report_dir: Path) -> dict[str, Any]:
    _read(processed_dir, "meta.json")
    _read(model_dir, "run.json")
    metrics = {
        "test": {"auc_macro": 0.875, "f1_macro": 0.5, "n": 12},
        "robustness": [{"masking_rate": 0.0, "auc_macro": 0.875}, {"masking_rate": 0.8, "auc_macro": 0.625}],
        "class_names": ["healthy", "rare"],
        "calibrated": True,
        "ece": float("nan"),
    }
    _write(report_dir, "metrics.json", metrics)
    return {"auc_macro": 0.875, "report_dir": Path(report_dir)}


def run_promote(
    params: Params, processed_dir: Path, model_dir: Path, evaluation_dir: Path, explanation_dir: Path,
    data_card_dir: Path, report_dir: Path,
) -> dict[str, Any]:
    _read(model_dir, "run.json")
    _read(explanation_dir, "metrics.json")  # the model card's inputs arrive as artifacts
    _read(data_card_dir, "data_card.json")
    candidate_auc = _read(evaluation_dir, "metrics.json")["test"]["auc_macro"]
    decision = {"promoted": True, "candidate_auc": candidate_auc}
    _write(report_dir, "decision.json", decision)
    return decision


def run_generate(
    params: Params, processed_dir: Path, model_dir: Path, synthetic_dir: Path, report_dir: Path
) -> dict[str, Any]:
    _read(model_dir, "run.json")
    n = params.generate.n_per_class * len(params.dataset.class_names)
    _write(synthetic_dir, "patients.json", {"n": n})
    _write(report_dir, "metrics.json", {"n_generated": n})
    return {"n_generated": n}


def run_explain(params: Params, processed_dir: Path, model_dir: Path, report_dir: Path) -> dict[str, Any]:
    _read(model_dir, "run.json")
    _write(report_dir, "metrics.json", {"n_patients": params.explain.n_patients})
    (Path(report_dir) / "index.html").write_text("<html></html>")
    return {"n_patients": params.explain.n_patients}


_FAKES = {
    "cohort": generate_cohort,
    "ingest": run_ingest,
    "preprocess": run_preprocess,
    "train": run_train,
    "evaluate": run_evaluate,
    "promote": run_promote,
    "generate": run_generate,
    "explain": run_explain,
}

for _spec in (STAGES[name] for name in PIPELINE_STAGES):
    _module = types.ModuleType(_spec.module, f"fake {_spec.name} stage (tests/kfp/fake_stages)")
    setattr(_module, _spec.function, _FAKES[_spec.name])
    sys.modules[_spec.module] = _module
