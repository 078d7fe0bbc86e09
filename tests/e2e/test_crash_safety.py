"""Crash safety: ``kill -9`` inside any stage, then a rerun, leaves the outputs of an uninterrupted run.

A reference pipeline runs uninterrupted, stage by stage, in one folder. In a second folder every
stage is started, killed with SIGKILL at a point drawn uniformly inside its own work (between 30 % and
90 % of its uninterrupted wall time, from a fixed seed, so a failure can be replayed), and run again;
its outputs must then equal the reference's byte for byte. Its inputs are the previous stage's
rerun outputs, already checked equal, so each stage is judged on its own.

JSON files are compared without their wall-clock fields (keys ending in ``seconds``). Not compared,
with the reason:
* ``reports/ingest/gx/*.json``: great-expectations writes a load time and random expectation ids;
* ``models/run.json``: the MLflow run id and registered version depend on the registry's history
  (a killed run may have registered a version already);
* ``reports/promote/decision.json`` and ``model_card.md`` (which reports that decision and the
  registered version): the wording depends on the registry state; what must hold is that the
  candidate ends up ``champion`` in both folders (checked instead).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from meddiff.config import load_params
from meddiff.stage_table import PIPELINE_STAGES, STAGES, Port
from meddiff.stages import default_paths

SEED = 20261130
KILL_WINDOW = (0.3, 0.9)
#: When a stage ends before its kill (the machine got faster), its outputs are removed and it is tried
#: again with half the delay, at most this many times.
KILL_ATTEMPTS = 4
#: Smaller than the other end-to-end runs: every stage runs three times here.
CRASH_OVERRIDES = [
    "cohort.n_patients=40", "evaluate.n_bootstrap=50", "explain.n_healthy=1", "explain.n_bootstrap=50",
    "generate.n_bootstrap=50",
]
NOT_COMPARED = ("reports/ingest/gx/", "models/run.json", "reports/promote/decision.json",
                "reports/promote/model_card.md")


@dataclass
class StageOutcome:
    killed_after_s: float
    kill_landed: bool
    differing: list[str] = field(default_factory=list)


def run_stage(work: Path, stage: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "meddiff.cli", stage, "--params", "params.yaml"],
        cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def finish(process: subprocess.Popen, stage: str) -> None:
    _, stderr = process.communicate(timeout=900)
    assert process.returncode == 0, f"{stage} failed: {stderr[-3000:]}"


def digests(work: Path, stage: str) -> dict[str, str]:
    """sha256 of every output file of ``stage`` in ``work``, by path relative to ``work``."""
    params = load_params(work / "params.yaml")
    found = {}
    for argument, folder in default_paths(params, stage).items():
        if argument not in {port.argument for port in _outputs(stage)}:
            continue
        for path in sorted((work / folder).rglob("*")):
            name = path.relative_to(work).as_posix()
            if path.is_file() and not name.startswith(NOT_COMPARED):
                found[name] = hashlib.sha256(_comparable_bytes(path)).hexdigest()
    return found


def _comparable_bytes(path: Path) -> bytes:
    """The file's bytes; for JSON, its content without wall-clock fields (keys ending in ``seconds``)."""
    if path.suffix != ".json":
        return path.read_bytes()

    def strip(node: object) -> object:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if not k.endswith("seconds")}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    return json.dumps(strip(json.loads(path.read_text())), sort_keys=True).encode()


def remove_outputs(work: Path, stage: str) -> None:
    params = load_params(work / "params.yaml")
    for port in _outputs(stage):
        target = work / default_paths(params, stage)[port.argument]
        if target.is_dir():
            shutil.rmtree(target)


def _outputs(stage: str) -> tuple[Port, ...]:
    return STAGES[stage].outputs


def champion_and_candidate(work: Path, env: dict[str, str]) -> tuple[str, str]:
    """The version the registry's ``champion`` alias points at, and the version this folder trained."""
    code = (
        "import mlflow; from mlflow.tracking import MlflowClient; "
        "mlflow.set_tracking_uri('sqlite:///mlruns.db'); "
        "print(MlflowClient().get_registered_model('meddiff-diagnosis').aliases.get('champion'))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    trained = json.loads((work / "models" / "run.json").read_text())["registered_version"]
    return result.stdout.strip(), str(trained)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory, tiny_params_yaml: Callable[..., str]) -> dict:
    reference, crashed = tmp_path_factory.mktemp("reference"), tmp_path_factory.mktemp("crashed")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    for work in (reference, crashed):
        (work / "params.yaml").write_text(tiny_params_yaml(CRASH_OVERRIDES))
    durations = {}
    for stage in PIPELINE_STAGES:
        started = time.perf_counter()
        finish(run_stage(reference, stage, env), stage)
        durations[stage] = time.perf_counter() - started
    rng = np.random.default_rng(SEED)
    results: dict[str, StageOutcome] = {}
    for stage in PIPELINE_STAGES:
        delay = float(rng.uniform(*KILL_WINDOW)) * durations[stage]
        for _ in range(KILL_ATTEMPTS):
            process = run_stage(crashed, stage, env)
            time.sleep(delay)
            landed = process.poll() is None
            if landed:
                os.kill(process.pid, signal.SIGKILL)
            process.communicate()
            if landed:
                break
            remove_outputs(crashed, stage)
            delay /= 2
        finish(run_stage(crashed, stage, env), stage)
        expected, got = digests(reference, stage), digests(crashed, stage)
        differing = sorted(name for name in expected.keys() | got.keys() if expected.get(name) != got.get(name))
        results[stage] = StageOutcome(round(delay, 2), landed, differing)
    results["champion"] = {"reference": champion_and_candidate(reference, env),
                           "crashed": champion_and_candidate(crashed, env)}
    return results


@pytest.mark.slow
@pytest.mark.parametrize("stage", PIPELINE_STAGES)
def test_kill_then_rerun_equals_uninterrupted(outcomes: dict, stage: str) -> None:
    outcome = outcomes[stage]
    assert outcome.kill_landed, f"{stage} finished before the kill at {outcome.killed_after_s} s: nothing was tested"
    assert not outcome.differing, f"{stage} killed after {outcome.killed_after_s} s, rerun differs: {outcome.differing}"


@pytest.mark.slow
def test_champion_after_a_killed_promote_is_the_candidate(outcomes: dict) -> None:
    for folder, (champion, trained) in outcomes["champion"].items():
        assert champion == trained, f"{folder}: champion is v{champion}, the folder trained v{trained}"
