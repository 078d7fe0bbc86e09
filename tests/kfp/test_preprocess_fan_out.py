"""The preprocess fan-out (issue 14): with ``pipeline.preprocess_shards: 2`` the compiled pipeline has a
``dsl.ParallelFor`` of ``preprocess-shard`` tasks whose collected folders one merge task turns into the
``preprocess`` outputs train reads; the loop runs under ``kfp.local`` and its processed set is array for array
that of one unsharded preprocess of the same ingest.

No ``from __future__ import annotations``: KFP reads the annotations of the pipeline defined here.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from kfp import dsl, local
from meddiff_components.stages import build_components
from meddiff_pipelines.pipeline import params_to_json
from meddiff_pipelines.preprocess_shards import SHARD_TASK, add_preprocess_fan_out

from meddiff.config import apply_overrides, load_params
from meddiff.data.dataset import ShardedArray, load_processed
from meddiff.data.preprocess import run_preprocess
from tests.kfp.test_ingest_fan_out import REPO, TINY_COHORT, _all_tasks, _compiled

SHARDS = 2

pytestmark = [
    pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Task .* have no effect in the current local runner:UserWarning"),
]


def test_two_shards_compile_to_a_parallel_for_and_a_merge_that_train_reads(tmp_path: Path) -> None:
    params = apply_overrides(load_params(REPO / "params.yaml"), [f"pipeline.preprocess_shards={SHARDS}"])
    spec = _compiled(params, tmp_path / "sharded.yaml")
    tasks = _all_tasks(spec)
    loops = [task for task in tasks.values() if "parameterIterator" in task]
    assert len(loops) == 2, "one ParallelFor per branch of the fork on raw_uri"
    for loop in loops:
        assert json.loads(loop["parameterIterator"]["items"]["raw"]) == list(range(SHARDS))
        (shard,) = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"].values()
        assert shard["taskInfo"]["name"] == SHARD_TASK
        assert shard["inputs"]["parameters"]["shard_count"]["runtimeValue"]["constant"] == SHARDS
    merges = {key: task for key, task in tasks.items()
              if re.fullmatch(r"comp-preprocess-merge(-\d+)?", task["componentRef"]["name"])}
    assert len(merges) == 2 and {task["taskInfo"]["name"] for task in merges.values()} == {"preprocess"}
    for task in merges.values():
        assert "processed_shards" in task["inputs"]["artifacts"]
        assert task["inputs"]["artifacts"]["interim"]["taskOutputArtifact"]["outputArtifactKey"] == "interim"
    train = [task for task in tasks.values() if task["taskInfo"]["name"] == "train"]
    assert train and all(task["inputs"]["artifacts"]["processed"]["taskOutputArtifact"]["producerTask"] in merges
                         for task in train)


def test_fan_out_runs_under_kfp_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cohort → ingest → ParallelFor(2 × preprocess-shard) → preprocess-merge with kfp.local; the merged
    processed set equals one unsharded preprocess of the interim folder the run wrote."""
    params = apply_overrides(load_params(REPO / "params.yaml"),
                             [*TINY_COHORT, "cohort.n_patients=40", "cohort.class_prevalence=[0.4,0.25,0.2,0.15]",
                              "preprocess.cache_dir=null", "preprocess.spatial_size=[16,16,16]",
                              "preprocess.pixdim_mm=[12.0,12.0,12.0]"])
    monkeypatch.delenv(params.ingest.deid_key_env, raising=False)
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "pipeline_root"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    components = build_components(image="meddiff:test")
    params_json = params_to_json(params)

    @dsl.pipeline(name="preprocess-fan-out")
    def fan_out(params_json: str = params_json) -> None:
        cohort = components["cohort"](params_json=params_json)
        ingest = components["ingest"](params_json=params_json, raw=cohort.outputs["raw"], raw_uri="")
        add_preprocess_fan_out(components["preprocess"], SHARDS,
                               {"params_json": params_json, "interim": ingest.outputs["interim"],
                                "data_version": ingest.outputs["data_version"]}, "preprocess", lambda task: task)

    fan_out()
    (run,) = [path for path in root.iterdir() if path.is_dir()]
    merged = load_processed(run / "preprocess-merge" / "processed")
    direct = tmp_path / "direct"
    run_preprocess(params, run / "ingest" / "interim", direct / "processed", direct / "report")
    whole = load_processed(direct / "processed")
    assert set(merged.arrays) == set(whole.arrays)
    for name, values in whole.arrays.items():
        np.testing.assert_array_equal(np.asarray(merged.arrays[name]), np.asarray(values), err_msg=name)
    assert isinstance(merged.arrays["image"], ShardedArray) and len(merged.arrays["image"].files) == SHARDS
    assert json.loads((run / "preprocess-merge" / "report" / "data_card.json").read_text()) == json.loads(
        (direct / "report" / "data_card.json").read_text())
    assert len([path for path in run.iterdir() if path.name.startswith("for-loop")]) == SHARDS
