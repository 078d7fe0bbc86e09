"""`dvc repro` end to end, in a temporary copy of the repository with a tiny params file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from meddiff.config import apply_overrides, load_params

REPO = Path(__file__).resolve().parents[2]

#: Small enough for CI (2 cores), large enough that every class and split is populated.
TINY_PIPELINE = [
    "cohort.n_patients=60",
    "cohort.class_prevalence=[0.4, 0.25, 0.25, 0.1]",
    "train.epochs=2",
    "train.model.image_channels=[4,8]",
    "train.model.d_model=16",
    "train.model.n_heads=2",
    "train.model.text_layers=1",
    "train.diffusion.unet_channels=[8,16]",
    "train.diffusion.num_train_timesteps=50",
    "evaluate.n_repeats=1",
    "generate.n_per_class=2",
    "generate.num_inference_steps=5",
    "train.diffusion.refine_epochs=5",
    "explain.n_patients=2",
]


def tiny_params_yaml(extra: list[str] | None = None) -> str:
    params = apply_overrides(load_params(REPO / "params.yaml"), TINY_PIPELINE + (extra or []))
    return yaml.safe_dump(params.to_dict(), sort_keys=False)


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
def test_dvc_repro_end_to_end(tmp_path: Path) -> None:
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

    status = subprocess.run(
        ["dvc", "status", "dvc.yaml"], cwd=work, env=env, capture_output=True, text=True, check=True
    )
    assert "changed" not in status.stdout, status.stdout  # everything up to date after repro
