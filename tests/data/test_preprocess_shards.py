"""``preprocess --shard i/n`` + ``--merge``: the same processed set as one unsharded run (issue 14)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pytest

from meddiff.cli import main
from meddiff.data.dataset import SHARDED_ARRAYS, SHARDS_DIR, ShardedArray, load_processed
from meddiff.data.ingest.shard import shard_of
from meddiff.data.preprocess import SHARD_PATIENTS_FILE, run_preprocess

if TYPE_CHECKING:
    from tests.data.conftest import Pipeline

N_SHARDS = 3


@pytest.fixture(scope="module")
def merged(pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three shards, then the merge, with cache off (each shard runs its images itself)."""
    root = tmp_path_factory.mktemp("sharded")
    for i in range(N_SHARDS):
        run_preprocess(pipeline.params, pipeline.interim, root / f"shard{i}", root / "unused", shard=f"{i}/{N_SHARDS}")
    assert not (root / "unused").exists(), "a shard writes no report"
    shards = [root / f"shard{i}" for i in reversed(range(N_SHARDS))]  # the order given does not matter
    run_preprocess(pipeline.params, pipeline.interim, root / "processed", root / "report", merge=shards)
    return root


def test_three_shards_and_merge_equal_one_unsharded_run(pipeline: Pipeline, merged: Path) -> None:
    whole, sharded = load_processed(pipeline.processed), load_processed(merged / "processed")
    assert set(whole.arrays) == set(sharded.arrays)
    for name, values in whole.arrays.items():
        np.testing.assert_array_equal(np.asarray(sharded.arrays[name]), np.asarray(values), err_msg=name)
    assert {k: v for k, v in sharded.meta.items() if k != "storage"} == {
        k: v for k, v in whole.meta.items() if k != "storage"}
    assert (merged / "processed" / "tokenizer.json").read_text() == (pipeline.processed / "tokenizer.json").read_text()
    assert json.loads((merged / "report" / "data_card.json").read_text()) == json.loads(
        (pipeline.preprocess_report / "data_card.json").read_text())
    assert isinstance(sharded.arrays["image"], ShardedArray) and len(sharded.arrays["image"].files) == N_SHARDS


def test_each_shard_holds_its_patients_by_the_ingest_hash_rule(pipeline: Pipeline, merged: Path) -> None:
    manifest = pd.read_parquet(pipeline.interim / "manifest.parquet")
    held = []
    for i in range(N_SHARDS):
        patients = np.load(merged / f"shard{i}" / SHARD_PATIENTS_FILE).tolist()
        assert patients == sorted(patients) and all(shard_of(p, N_SHARDS) == i for p in patients)
        held += patients
    assert sorted(held) == sorted(manifest["patient_id"])
    assert min(len(np.load(merged / f"shard{i}" / SHARD_PATIENTS_FILE)) for i in range(N_SHARDS)) > 0


def test_the_merge_links_the_shard_volumes_instead_of_copying(merged: Path) -> None:
    for i, folder in enumerate(sorted((merged / "processed" / SHARDS_DIR).iterdir())):
        for name in SHARDED_ARRAYS:
            assert (folder / f"{name}.npy").samefile(merged / f"shard{i}" / f"{name}.npy")


def test_the_merge_refuses_a_missing_or_foreign_shard(pipeline: Pipeline, merged: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"shards 0\.\.n-1"):
        run_preprocess(pipeline.params, pipeline.interim, tmp_path / "p", tmp_path / "r",
                       merge=[merged / "shard0", merged / "shard1"])
    other = pipeline.params.model_copy(update={"preprocess": pipeline.params.preprocess.model_copy(
        update={"hu_window": (-50.0, 150.0)})})
    with pytest.raises(ValueError, match="image parameters"):
        run_preprocess(other, pipeline.interim, tmp_path / "p", tmp_path / "r",
                       merge=[merged / f"shard{i}" for i in range(N_SHARDS)])
    with pytest.raises(ValueError, match=r"--shard .* or --merge"):
        run_preprocess(pipeline.params, pipeline.interim, tmp_path / "p", tmp_path / "r", shard="0/3",
                       merge=[merged / "shard0"])
    assert not (tmp_path / "p").exists(), "nothing written on a refused merge"


def test_the_cli_runs_a_shard_and_the_merge(pipeline: Pipeline, merged: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps(pipeline.params.to_dict(), default=str))
    common = ["--params", str(params), "--interim-dir", str(pipeline.interim)]
    assert main(["preprocess", *common, "--shard", "1/3", "--processed-dir", str(tmp_path / "s1")]) == 0
    for name in SHARDED_ARRAYS:
        np.testing.assert_array_equal(np.load(tmp_path / "s1" / f"{name}.npy"),
                                      np.load(merged / "shard1" / f"{name}.npy"))
    shards = [str(merged / "shard0"), str(tmp_path / "s1"), str(merged / "shard2")]
    assert main(["preprocess", *common, "--merge", *shards, "--processed-dir", str(tmp_path / "p"),
                 "--report-dir", str(tmp_path / "r")]) == 0
    np.testing.assert_array_equal(np.asarray(load_processed(tmp_path / "p").arrays["image"]),
                                  np.asarray(load_processed(pipeline.processed).arrays["image"]))
