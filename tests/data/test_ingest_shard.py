"""Sharded ingest (issue 14): ``ingest --shard i/n`` over 4 shards + ``ingest-merge`` gives the manifest,
counts, quarantine and interim files of one unsharded run; the shard hash is stable; a bad shard set is
refused."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from meddiff.config import Params
from meddiff.data.ingest.run import run_ingest
from meddiff.data.ingest.shard import SHARD_FILE, UNASSIGNED_SHARD, Shard, merge_ingest, read_shard_marker, shard_of

SHARDS = 4


@dataclass(frozen=True)
class Outputs:
    interim: Path
    quarantine: Path
    report: Path

    @classmethod
    def under(cls, root: Path) -> Outputs:
        return cls(root / "interim", root / "quarantine", root / "report")


@dataclass(frozen=True)
class ShardedRun:
    whole: Outputs
    shards: list[Outputs]
    merged: Outputs


@pytest.fixture(scope="module")
def sharded(tiny_params: Params, raw_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> ShardedRun:
    os.environ.pop(tiny_params.ingest.deid_key_env, None)  # the ephemeral (synthetic) key: reproducible
    root = tmp_path_factory.mktemp("sharded")
    whole = Outputs.under(root / "whole")
    run_ingest(tiny_params, raw_cohort, whole.interim, whole.quarantine, whole.report)
    shards = [Outputs.under(root / f"shard-{i}") for i in range(SHARDS)]
    for index in reversed(range(SHARDS)):  # any order: the merge orders by the shard markers
        part = shards[index]
        run_ingest(tiny_params, raw_cohort, part.interim, part.quarantine, part.report, shard=f"{index}/{SHARDS}")
    merged = Outputs.under(root / "merged")
    merge_ingest([s.interim for s in shards], [s.quarantine for s in shards], [s.report for s in shards],
                 merged.interim, merged.quarantine, merged.report)
    return ShardedRun(whole, shards, merged)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _lines(quarantine: Path) -> Counter:
    return Counter((quarantine / "quarantine.jsonl").read_text().splitlines())


def test_shard_hash_is_sha256_of_the_raw_id_and_stable() -> None:
    digest = hashlib.sha256(b"P00017").digest()
    assert shard_of("P00017", 7) == int.from_bytes(digest[:8], "big") % 7
    assert shard_of(None, 5) == shard_of("", 5) == UNASSIGNED_SHARD
    assert shard_of("anything", 1) == 0
    spread = Counter(shard_of(f"P{i:05d}", SHARDS) for i in range(400))
    assert set(spread) == set(range(SHARDS)) and min(spread.values()) > 400 / SHARDS / 2


def test_shard_spec_is_parsed_and_checked() -> None:
    assert Shard.parse("2/4") == Shard(2, 4)
    assert Shard.parse(" 0 / 1 ").label == "0-of-1"
    assert Shard(1, 4).folder(Path("data/interim")) == Path("data/interim-shard-1-of-4")
    for bad in ("4/4", "-1/4", "1", "a/b", "0/0"):
        with pytest.raises(ValueError, match="shard"):
            Shard.parse(bad)


def test_merged_manifest_equals_the_unsharded_one(sharded: ShardedRun) -> None:
    whole = pd.read_parquet(sharded.whole.interim / "manifest.parquet")
    merged = pd.read_parquet(sharded.merged.interim / "manifest.parquet")
    assert len(whole) > 0
    pd.testing.assert_frame_equal(merged, whole)
    per_shard = [set(pd.read_parquet(s.interim / "manifest.parquet")["patient_id"]) for s in sharded.shards]
    assert sum(len(p) for p in per_shard) == len(whole) and all(per_shard), "shards are disjoint and non-empty"


def test_merged_counts_equal_the_unsharded_ones(sharded: ShardedRun) -> None:
    whole = json.loads((sharded.whole.report / "validation.json").read_text())
    merged = json.loads((sharded.merged.report / "validation.json").read_text())
    assert merged == whole
    shard_counts = [json.loads((s.report / "validation.json").read_text()) for s in sharded.shards]
    assert sum(s["records_in"] for s in shard_counts) == whole["records_in"]
    assert whole["quarantined"] > 0 and merged["records_in"] == merged["accepted"] + merged["quarantined"]
    gx = json.loads((sharded.merged.report / "gx" / "patient.json").read_text())
    assert len(gx["shards"]) == SHARDS and gx["success"] == whole["gx_suites"]["patient"]["success"]
    assert (sharded.merged.report / "validation.html").read_text() == (
        sharded.whole.report / "validation.html").read_text()


def test_merged_quarantine_and_interim_files_equal_the_unsharded_ones(sharded: ShardedRun) -> None:
    assert _lines(sharded.merged.quarantine) == _lines(sharded.whole.quarantine)
    assert _files(sharded.merged.quarantine).keys() == _files(sharded.whole.quarantine).keys()
    whole_files = {k: v for k, v in _files(sharded.whole.interim).items() if k != "manifest.parquet"}
    merged_files = {k: v for k, v in _files(sharded.merged.interim).items() if k != "manifest.parquet"}
    assert merged_files == whole_files
    assert any(name.startswith("images/") for name in whole_files)
    assert not (sharded.merged.interim / SHARD_FILE).exists()


def test_each_shard_output_is_marked(sharded: ShardedRun) -> None:
    for index, part in enumerate(sharded.shards):
        for folder in (part.interim, part.quarantine, part.report):
            assert read_shard_marker(folder) == Shard(index, SHARDS)


def test_an_incomplete_or_repeated_shard_set_is_refused(sharded: ShardedRun, tmp_path: Path) -> None:
    parts = sharded.shards
    target = Outputs.under(tmp_path)
    with pytest.raises(ValueError, match=r"shards \[3\] of 4 are missing"):
        merge_ingest([p.interim for p in parts[:3]], [p.quarantine for p in parts[:3]],
                     [p.report for p in parts[:3]], target.interim, target.quarantine, target.report)
    with pytest.raises(ValueError, match="given twice"):
        merge_ingest([p.interim for p in [*parts, parts[0]]], [p.quarantine for p in parts],
                     [p.report for p in parts], target.interim, target.quarantine, target.report)
    with pytest.raises(FileNotFoundError, match=SHARD_FILE):
        merge_ingest([sharded.whole.interim], [sharded.whole.quarantine], [sharded.whole.report],
                     target.interim, target.quarantine, target.report)
    assert not target.interim.exists(), "a refused merge writes nothing"


def test_cli_shards_into_sibling_folders_and_merges(sharded: ShardedRun, tiny_params: Params, raw_cohort: Path,
                                                    tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``meddiff ingest --shard i/2`` writes ``<folder>-shard-i-of-2``; ``meddiff ingest-merge --shards 2``
    merges them into the folders given: the manifest and counts of one unsharded run."""
    import yaml

    from meddiff.cli import main

    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(tiny_params.to_dict(), sort_keys=False))
    target = Outputs.under(tmp_path / "out")
    folders = ["--interim-dir", str(target.interim), "--quarantine-dir", str(target.quarantine),
               "--report-dir", str(target.report)]
    for index in range(2):
        assert main(["ingest", "--params", str(params_file), "--raw-dir", str(raw_cohort), "--shard", f"{index}/2",
                     *folders]) == 0
        assert read_shard_marker(Shard(index, 2).folder(target.interim)) == Shard(index, 2)
    assert main(["ingest-merge", "--params", str(params_file), "--shards", "2", *folders]) == 0
    merged = json.loads(capsys.readouterr().out.split("\n}\n")[-2] + "\n}")
    whole = json.loads((sharded.whole.report / "validation.json").read_text())
    assert (merged["records_in"], merged["n_patients"], merged["shards"]) == (
        whole["records_in"], whole["manifest_patients"], 2)
    pd.testing.assert_frame_equal(pd.read_parquet(target.interim / "manifest.parquet"),
                                  pd.read_parquet(sharded.whole.interim / "manifest.parquet"))
    assert main(["ingest", "--params", str(params_file), "--shard", "2/2", *folders]) == 2
