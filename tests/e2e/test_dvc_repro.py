"""`dvc repro` end to end, in a temporary copy of the repository with a tiny params file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from meddiff.data.phi_scan import find_identifiers, raw_identifiers

REPO = Path(__file__).resolve().parents[2]

def copy_repository(target: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()
    for name in files:
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


@pytest.mark.slow
def test_dvc_repro_end_to_end(tmp_path: Path, tiny_params_yaml: Callable[..., str]) -> None:
    work = tmp_path / "repo"
    work.mkdir()
    copy_repository(work)
    (work / "params.yaml").write_text(tiny_params_yaml())
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    result = subprocess.run(["dvc", "repro"], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    validation = json.loads((work / "reports/ingest/validation.json").read_text())
    assert validation["records_in"] == validation["accepted"] + validation["quarantined"]
    assert validation["quarantined"] > 0  # the cohort injects bad records on purpose
    metrics = json.loads((work / "reports/evaluate/metrics.json").read_text())
    assert 0.0 <= metrics["test"]["auc_macro"]["value"] <= 1.0
    random_rows = [r for r in metrics["robustness"] if r["scenario"] == "random"]
    assert sorted({r["masking_rate"] for r in random_rows}) == [0.0, 0.2, 0.4, 0.6, 0.8]
    decision = json.loads((work / "reports/promote/decision.json").read_text())
    assert decision["promoted"] is True  # the first version becomes champion
    assert decision["candidate_auc"] == metrics["test"]["auc_macro"]["value"]
    assert (work / "reports/evaluate/robustness.csv").is_file()
    assert json.loads((work / "reports/generate/metrics.json").read_text())["n_synthetic"] == 8
    assert (work / "reports/explain/index.html").is_file()
    run = json.loads((work / "models/run.json").read_text())
    assert run["registered_version"] == "1"
    assert (work / "mlruns.db").is_file()
    assert (work / "dvc.lock").is_file()
    # make run ends by predicting for the new patients' drop (one malformed patient, quarantined)
    predicted = json.loads((work / "reports/predict/metrics.json").read_text())
    assert predicted["n_patients"] >= 20 and predicted["quarantined_by_reason"]["out_of_range"] == 1
    assert (work / "reports/predict/predictions.csv").read_text().count("\n") == predicted["n_patients"] + 1
    assert (work / "reports/predict/risk_assessments.ndjson").read_text().count("\n") == predicted["n_patients"]
    # and by checking the same drop for drift against the champion's training reference
    monitored = json.loads((work / "reports/monitor/decision.json").read_text())
    assert monitored["n_new_patients"] == predicted["n_patients"] and monitored["n_new_labelled"] == 0
    assert set(monitored["drifted_share"]) == {"ehr", "note", "image", "latent"}
    assert (work / "reports/monitor/index.html").is_file()

    # Nothing identifying left raw/: every output a run writes, MLflow's store and artefacts included.
    # The quarantines keep rejected raw records for review and are PHI-bearing by design.
    identifiers = raw_identifiers(work / "data" / "raw") + raw_identifiers(work / "data" / "raw_new")
    assert len(identifiers) > 20
    outputs = [work / "data", work / "models", work / "reports", work / "mlartifacts", work / "mlruns.db"]
    assert all(p.exists() for p in outputs)
    raw_and_quarantine = [work / "data" / "raw", work / "data" / "raw_new", work / "data" / "quarantine",
                          work / "reports" / "predict" / "quarantine.jsonl"]
    leaks = find_identifiers(outputs, identifiers, skip=raw_and_quarantine)
    assert not leaks, [f"{leak.path.relative_to(work)}: {leak.identifiers[:3]}" for leak in leaks]

    status = subprocess.run(
        ["dvc", "status", "dvc.yaml"], cwd=work, env=env, capture_output=True, text=True, check=True
    )
    assert "changed" not in status.stdout, status.stdout  # everything up to date after repro
