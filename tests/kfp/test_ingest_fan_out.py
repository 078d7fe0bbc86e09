"""The ingest fan-out (issue 14): with ``pipeline.ingest_shards: 2`` the compiled pipeline has a
``dsl.ParallelFor`` of ``ingest-shard`` tasks whose collected outputs one merge task turns into the
``ingest`` outputs the later tasks read; with the default 1 nothing changes; the loop runs under
``kfp.local`` and its merged manifest and counts are those of one unsharded ingest of the same drop.

No ``from __future__ import annotations``: KFP reads the annotations of the pipeline defined here.
"""

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from kfp import dsl, local
from meddiff_components.stages import build_components
from meddiff_pipelines.ingest_shards import SHARD_TASK, add_ingest_fan_out
from meddiff_pipelines.local import run_data_version
from meddiff_pipelines.pipeline import build_pipeline, params_to_json, write_compiled

from meddiff.config import Params, apply_overrides, load_params
from meddiff.data.drop import folder_version
from meddiff.data.ingest.run import run_ingest

REPO = Path(__file__).resolve().parents[2]
SHARDS = 2
#: a cohort of a few seconds per task (tests/data's tiny cohort: small volumes, some injected faults)
TINY_COHORT = [
    "cohort.n_patients=16", "cohort.volume_shape=[12,24,24]", "cohort.pixel_spacing_mm=8.0",
    "cohort.slice_thickness_mm=12.0", "cohort.corrupt_fraction=0.1", "ingest.allow_ephemeral_key_for_synthetic=true",
]

pytestmark = [
    pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Task .* have no effect in the current local runner:UserWarning"),
]


def _compiled(params: Params, path: Path) -> dict[str, Any]:
    write_compiled(build_pipeline(params, image="meddiff:test"), path)
    return next(yaml.safe_load_all(path.read_text()))


def _all_tasks(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every task of every DAG in the spec by task key (the fork's two branches repeat names as ``-2``)."""
    found = {}
    for component in spec["components"].values():
        found.update(component.get("dag", {}).get("tasks", {}))
    return found


def test_two_shards_compile_to_a_parallel_for_and_a_merge(tmp_path: Path) -> None:
    params = apply_overrides(load_params(REPO / "params.yaml"), [f"pipeline.ingest_shards={SHARDS}"])
    spec = _compiled(params, tmp_path / "sharded.yaml")
    tasks = _all_tasks(spec)
    loops = [task for task in tasks.values() if "parameterIterator" in task]
    assert len(loops) == 2, "one ParallelFor per branch of the fork on raw_uri"
    for loop in loops:
        assert json.loads(loop["parameterIterator"]["items"]["raw"]) == list(range(SHARDS))
        inner = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
        (shard,) = inner.values()
        assert shard["taskInfo"]["name"] == SHARD_TASK
        assert re.fullmatch(r"comp-ingest-shard(-\d+)?", shard["componentRef"]["name"])
        assert shard["inputs"]["parameters"]["shard_count"]["runtimeValue"]["constant"] == SHARDS
    merges = {key: task for key, task in tasks.items()
              if re.fullmatch(r"comp-ingest-merge(-\d+)?", task["componentRef"]["name"])}
    assert len(merges) == 2
    assert {task["taskInfo"]["name"] for task in merges.values()} == {"ingest"}
    for task in merges.values():
        collected = task["inputs"]["artifacts"]
        assert set(collected) == {"interim_shards", "quarantine_shards", "report_shards"}
        assert all("pipelinechannel--ingest-shard" in a["taskOutputArtifact"]["outputArtifactKey"]
                   for a in collected.values())
    preprocess = [task for task in tasks.values() if task["taskInfo"]["name"] == "preprocess"]
    assert preprocess and all(
        task["inputs"]["artifacts"]["interim"]["taskOutputArtifact"]["producerTask"] in merges for task in preprocess)
    assert all(task["inputs"]["parameters"]["data_version"]["taskOutputParameter"]["producerTask"] in merges
               for task in preprocess)


def test_one_shard_is_the_plain_ingest_task(tmp_path: Path) -> None:
    spec = _compiled(load_params(REPO / "params.yaml"), tmp_path / "plain.yaml")
    tasks = _all_tasks(spec)
    assert not any("parameterIterator" in task for task in tasks.values())
    assert {task["componentRef"]["name"] for task in tasks.values()} >= {"comp-ingest"}
    assert not any("ingest-shard" in name or "ingest-merge" in name for name in spec["components"])


def test_fan_out_runs_under_kfp_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cohort → ParallelFor(2 × ingest-shard) → ingest-merge with kfp.local; the merged outputs equal one
    unsharded ingest of the cohort the run wrote."""
    params = apply_overrides(load_params(REPO / "params.yaml"), TINY_COHORT)
    monkeypatch.delenv(params.ingest.deid_key_env, raising=False)  # the ephemeral (synthetic) key
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "pipeline_root"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    components = build_components(image="meddiff:test")
    params_json = params_to_json(params)

    @dsl.pipeline(name="ingest-fan-out")
    def fan_out(params_json: str = params_json) -> None:
        cohort = components["cohort"](params_json=params_json)
        add_ingest_fan_out(components["ingest"], SHARDS,
                           {"params_json": params_json, "raw": cohort.outputs["raw"], "raw_uri": ""}, "ingest",
                           lambda task: task)

    fan_out()
    (run,) = [path for path in root.iterdir() if path.is_dir()]
    merged = run / "ingest-merge"
    direct = tmp_path / "direct"
    run_ingest(params, run / "cohort" / "raw", direct / "interim", direct / "quarantine", direct / "report")

    pd.testing.assert_frame_equal(pd.read_parquet(merged / "interim" / "manifest.parquet"),
                                  pd.read_parquet(direct / "interim" / "manifest.parquet"))
    merged_counts = json.loads((merged / "report" / "validation.json").read_text())
    assert merged_counts == json.loads((direct / "report" / "validation.json").read_text())
    assert merged_counts["quarantined"] > 0
    output = json.loads((merged / "executor_output.json").read_text())["parameterValues"]["Output"]
    assert output["records_in"] == merged_counts["records_in"] and output["shards"] == SHARDS
    assert output["data_version"] == folder_version(run / "cohort" / "raw") == run_data_version(run)
    assert json.loads((merged / "interim" / "data_version.json").read_text())["data_version"] == output["data_version"]
    assert len([path for path in run.iterdir() if path.name.startswith("for-loop")]) == SHARDS  # iterations


@pytest.mark.parametrize("shards", [0, 1])
def test_a_fan_out_needs_two_shards(shards: int) -> None:
    """One shard is the plain task: the fan-out refuses it with a message that says so."""
    components = build_components(image="meddiff:test")
    with pytest.raises(ValueError, match=f"ingest fan-out needs at least 2 shards, got {shards}"):
        add_ingest_fan_out(components["ingest"], shards, {}, "ingest", lambda task: task)
