"""Run every benchmark under ``bench/`` and write one JSON of ratios: ``reports/bench.json`` (``make bench``).

Each benchmark measures its target and its baseline in the same process (these machines are noisy,
so only ratios travel between machines) and writes its own JSON; this runner starts each one as a
subprocess, keeps its full result under ``reports/bench/<name>.json`` and copies the ratios into
``reports/bench.json``:

* ``ingest_throughput``: ingest slices/s per worker ÷ a bare ``pydicom.dcmread`` + ``pixel_array`` loop,
  and the speed-up of more workers over one;
* ``train_throughput``: our training step ÷ a minimal hand-written loop over the same model and
  batches (overhead), and achieved FLOP/s ÷ a matmul peak measured in the same run;
* ``memory``: peak RSS of cohort, ingest, preprocess and one training epoch at a large ÷ a small cohort
  (``--full``: 10,000 ÷ 1,000 patients, about an hour on 2 cores), and the data-loading share of the
  training step;
* ``modality_cost``: the training step of an EHR-only model ÷ that of the full three-modality model (a
  modality the data lack costs nothing; target ≤ 0.10);
* ``cohort_separability``: macro AUC of a logistic regression per modality on the processed cohort (a
  data check, not a speed ratio); it needs ``data/processed`` (``make run``) and is skipped without it.

    python bench/run_all.py [--full] [--only NAME ...]

``--full`` runs each benchmark at its own default (larger) size; the default is a quick run of a few
minutes on 2 cores. Exit status 1 when a benchmark fails (its stderr tail is in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUTPUT_DIR = ROOT / "reports" / "bench"
SUMMARY = ROOT / "reports" / "bench.json"
#: Characters of a failed benchmark's stderr kept in the summary.
STDERR_TAIL = 3000


@dataclass(frozen=True)
class Benchmark:
    name: str
    quick_args: tuple[str, ...]
    ratios: Callable[[dict[str, Any]], dict[str, Any]]
    #: a path (relative to the repository) that must exist, else the benchmark is skipped with a reason
    requires: str = ""
    #: the benchmark writes its JSON here itself instead of taking ``--output``
    writes: str = ""


def _ingest_ratios(result: dict[str, Any]) -> dict[str, Any]:
    throughput = result["throughput"]
    return {
        "ingest_per_core_vs_bare_pydicom": throughput["ratio_per_core"],
        "ingest_speedup_vs_1_worker": throughput["speedup_vs_1_worker"],
    }


def _train_ratios(result: dict[str, Any]) -> dict[str, Any]:
    return {
        "train_step_overhead_vs_plain_loop": result["overhead_ratio"],
        "train_fraction_of_matmul_peak": result["fraction_of_matmul_peak"],
    }


def _memory_ratios(result: dict[str, Any]) -> dict[str, Any]:
    ratios = {f"peak_rss_{stage}_large_vs_small": entry["ratio"] for stage, entry in result["ratios"].items()}
    shares = [share for share in result["data_loading_share"].values() if share is not None]
    return {**ratios, "train_data_loading_share": max(shares) if shares else None}


def _modality_ratios(result: dict[str, Any]) -> dict[str, Any]:
    return {"ehr_only_vs_full_train_step": result["ehr_only_vs_full_step"]}


def _separability(result: dict[str, Any]) -> dict[str, Any]:
    return {f"macro_auc_{name}": entry["macro_auc"] for name, entry in result["results"].items()}


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark(
        "ingest_throughput", ("--patients", "40", "--repeats", "1", "--skip-memory"), _ingest_ratios,
        writes="reports/bench/ingest_throughput.json",
    ),
    Benchmark("train_throughput", ("--steps", "5", "--rounds", "2"), _train_ratios),
    Benchmark("modality_cost", ("--steps", "6"), _modality_ratios),
    Benchmark("cohort_separability", (), _separability, requires="data/processed/meta.json"),
    Benchmark("memory", ("--sizes", "100", "400"), _memory_ratios),
)


def _command(benchmark: Benchmark, full: bool, output: Path) -> list[str]:
    command = [sys.executable, str(ROOT / "bench" / f"{benchmark.name}.py")]
    if not full:
        command += list(benchmark.quick_args)
    if benchmark.name == "cohort_separability":
        command += ["--json", str(output)]
    elif not benchmark.writes:
        command += ["--output", str(output)]
    return command


def run(benchmark: Benchmark, full: bool) -> dict[str, Any]:
    """Run one benchmark; its status, wall time, ratios and where its full result is."""
    if benchmark.requires and not (ROOT / benchmark.requires).exists():
        return {"status": "skipped", "reason": f"{benchmark.requires} does not exist (run `make run` first)"}
    output = ROOT / (benchmark.writes or f"reports/bench/{benchmark.name}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    completed = subprocess.run(_command(benchmark, full, output), cwd=ROOT, capture_output=True, text=True)
    seconds = round(time.perf_counter() - started, 1)
    if completed.returncode != 0 or not output.is_file():
        return {
            "status": "failed", "seconds": seconds, "exit_code": completed.returncode,
            "stderr_tail": completed.stderr[-STDERR_TAIL:],
        }
    result = json.loads(output.read_text())
    return {
        "status": "ok", "seconds": seconds, "ratios": benchmark.ratios(result),
        "result_file": output.relative_to(ROOT).as_posix(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="each benchmark at its own default size")
    parser.add_argument("--only", nargs="*", default=None, choices=[b.name for b in BENCHMARKS])
    args = parser.parse_args(argv)
    import torch

    summary: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.is_available(), "load_average_1min": os.getloadavg()[0],
        },
        "mode": "full" if args.full else "quick",
        "benchmarks": {},
    }
    for benchmark in BENCHMARKS:
        if args.only and benchmark.name not in args.only:
            continue
        print(f"bench: {benchmark.name} …", flush=True)
        summary["benchmarks"][benchmark.name] = entry = run(benchmark, args.full)
        print(f"bench: {benchmark.name}: {entry['status']} {json.dumps(entry.get('ratios', entry.get('reason', '')))}")
    SUMMARY.parent.mkdir(parents=True, exist_ok=True)
    staging = SUMMARY.with_suffix(".json.tmp")
    staging.write_text(json.dumps(summary, indent=2) + "\n")
    staging.replace(SUMMARY)
    print(f"written: {SUMMARY.relative_to(ROOT)}")
    return 1 if any(entry["status"] == "failed" for entry in summary["benchmarks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
