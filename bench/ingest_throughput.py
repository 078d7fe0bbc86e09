"""Ingest throughput and memory (a benchmark, not a test): ratios measured in one run.

1. **Throughput.** One synthetic cohort; the imaging part of ``ingest`` (header scan, grouping,
   geometry checks, decode + rescale, NIfTI write, DICOM de-identification) against a bare loop of
   ``pydicom.dcmread`` + ``pixel_array`` over the same files, in slices/s; ``ingest.num_workers`` 1, 2, …
   up to the cores. The ratio per core = ingest slices/s per worker ÷ bare-loop slices/s. On a shared
   machine wall-clock rates follow the other jobs, so the same runs are also reported per CPU second
   (this process and its reaped workers: ``resource.getrusage``), with the load average before and after.
2. **Memory.** Peak RSS (``resource.getrusage``, RUSAGE_CHILDREN) of a fresh process running
   ``cohort`` and, separately, ``ingest``, for two cohort sizes (default 1,000 and 3,000 patients);
   growth per 1,000 patients is reported so that 10,000 can be extrapolated (labelled as such).

    python bench/ingest_throughput.py [--patients 200] [--memory-sizes 1000 3000] [--skip-memory] [--output PATH]

Writes ``reports/bench/ingest_throughput.json`` (or ``--output``) and a Markdown table beside it (``.md``),
which it also prints.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _params(n_patients: int, workers: int = 0) -> dict:
    return {"seed": 42, "cohort": {"n_patients": n_patients, "num_workers": 0, "corrupt_fraction": 0.0},
            "ingest": {"allow_ephemeral_key_for_synthetic": True, "num_workers": workers},
            "preprocess": {"cache_dir": None}}


def _cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (pool workers), user + system."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _bare_loop(files: list[Path]) -> tuple[float, float]:
    """(slices per wall second, slices per CPU second) of dcmread + pixel_array + rescale."""
    import pydicom

    started, cpu = time.perf_counter(), _cpu_seconds()
    for path in files:
        ds = pydicom.dcmread(path)
        _ = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return len(files) / (time.perf_counter() - started), len(files) / (_cpu_seconds() - cpu)


def _ingest_imaging(raw: Path, files: list[Path], workers: int) -> tuple[float, float]:
    """(slices per wall second, slices per CPU second) of ingest's imaging part with ``workers``."""
    from meddiff.data.deid import Pseudonymizer
    from meddiff.data.ingest import ingest_dicom
    from meddiff.data.ingest.imaging import HeaderStore
    from meddiff.data.quarantine import Ledger

    with tempfile.TemporaryDirectory() as scratch, HeaderStore() as store:
        started, cpu = time.perf_counter(), _cpu_seconds()
        rows, _, _ = ingest_dicom(raw, files, Path(scratch), Ledger(), workers, Pseudonymizer(b"b" * 32),
                                  headers_dir=Path(scratch), store=store)
        seconds, cpu_seconds = time.perf_counter() - started, _cpu_seconds() - cpu
    if not rows:
        raise RuntimeError("no series assembled: the benchmark cohort is unusable")
    return len(files) / seconds, len(files) / cpu_seconds


def throughput(n_patients: int, repeats: int) -> dict:
    from meddiff.config import params_from_dict
    from meddiff.data.cohort import generate_cohort

    cores = os.cpu_count() or 1
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        raw = Path(scratch) / "raw"
        generate_cohort(params_from_dict(_params(n_patients)), raw)
        files = sorted((raw / "imaging").rglob("*.dcm"))
        _bare_loop(files[:200])  # warm the page cache and imports
        bare_runs = [_bare_loop(files) for _ in range(repeats)]
        bare, bare_cpu = max(r[0] for r in bare_runs), max(r[1] for r in bare_runs)
        by_workers, cpu_rate = {}, {}
        for workers in sorted({1, 2, cores} | ({4} if cores >= 4 else set())):
            if workers <= cores:
                runs = [_ingest_imaging(raw, files, workers) for _ in range(repeats)]
                by_workers[workers], cpu_rate[workers] = max(r[0] for r in runs), max(r[1] for r in runs)
    return {
        "patients": n_patients, "dicom_files": len(files), "cores": cores,
        "load_average_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "bare_pydicom_slices_per_s": round(bare, 1),
        "ingest_slices_per_s": {str(k): round(v, 1) for k, v in by_workers.items()},
        "ratio_per_core": {str(k): round(v / k / bare, 3) for k, v in by_workers.items()},
        "speedup_vs_1_worker": {str(k): round(v / by_workers[1], 2) for k, v in by_workers.items()},
        "bare_pydicom_slices_per_cpu_s": round(bare_cpu, 1),
        "ingest_slices_per_cpu_s": {str(k): round(v, 1) for k, v in cpu_rate.items()},
        "ratio_per_cpu_s": {str(k): round(v / bare_cpu, 3) for k, v in cpu_rate.items()},
    }


_CHILD = """
import json, resource, sys, time
from pathlib import Path
from meddiff.config import params_from_dict
stage, n, root = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
params = params_from_dict(json.loads(sys.argv[4]))
started = time.perf_counter()
if stage == "cohort":
    from meddiff.data.cohort import generate_cohort
    generate_cohort(params, root / "raw")
else:
    from meddiff.data.ingest import run_ingest
    run_ingest(params, root / "raw", root / "interim", root / "quarantine", root / "report")
self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
children_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"seconds": time.perf_counter() - started, "self_kb": self_kb, "children_kb": children_kb}))
"""


def memory(sizes: list[int], workers: int) -> dict:
    out = {}
    for n in sizes:
        with tempfile.TemporaryDirectory() as scratch:
            entry = {}
            for stage in ("cohort", "ingest"):
                completed = subprocess.run(
                    [sys.executable, "-c", _CHILD, stage, str(n), scratch, json.dumps(_params(n, workers))],
                    capture_output=True, text=True, check=True, cwd=ROOT,
                )
                result = json.loads(completed.stdout.strip().splitlines()[-1])
                entry[stage] = {"seconds": round(result["seconds"], 1),
                                "peak_rss_main_mb": round(result["self_kb"] / 1024, 1),
                                "peak_rss_largest_worker_mb": round(result["children_kb"] / 1024, 1)}
            out[str(n)] = entry
            print(f"  memory {n} patients: {entry}", flush=True)
    if len(sizes) >= 2:
        low, high = str(min(sizes)), str(max(sizes))
        per_k = {stage: (out[high][stage]["peak_rss_main_mb"] - out[low][stage]["peak_rss_main_mb"])
                 / ((max(sizes) - min(sizes)) / 1000) for stage in ("cohort", "ingest")}
        out["growth_mb_per_1000_patients"] = {k: round(v, 1) for k, v in per_k.items()}
        out["extrapolated_10000_mb (linear, not measured)"] = {
            stage: round(out[high][stage]["peak_rss_main_mb"] + per_k[stage] * (10000 - max(sizes)) / 1000, 0)
            for stage in ("cohort", "ingest")}
    return out


def markdown(results: dict) -> str:
    """The throughput table (wall clock and per CPU second) and, when measured, the memory table."""
    t = results["throughput"]
    before, after = t["load_average_1min_before_after"]
    lines = [f"Ingest imaging throughput ({t['patients']} patients, {t['dicom_files']:,} DICOM files, {t['cores']} "
             f"cores, load average {before} before / {after} after)", "",
             "| | slices/s (wall) | ratio per core | speed-up vs 1 worker | slices per CPU s | ratio per CPU s |",
             "|---|---|---|---|---|---|",
             f"| bare pydicom loop | {t['bare_pydicom_slices_per_s']} | 1 | — | "
             f"{t['bare_pydicom_slices_per_cpu_s']} | 1 |"]
    for k in t["ingest_slices_per_s"]:
        lines.append(f"| ingest, {k} worker{'s' if k != '1' else ''} | {t['ingest_slices_per_s'][k]} | "
                     f"{t['ratio_per_core'][k]} | {t['speedup_vs_1_worker'][k]}× | {t['ingest_slices_per_cpu_s'][k]} | "
                     f"{t['ratio_per_cpu_s'][k]} |")
    sizes = [n for n in results.get("memory", {}) if n.isdigit()]
    if sizes:
        lines += ["", "| patients | ingest peak RSS main / largest worker (MB) | ingest seconds |", "|---|---|---|"]
        for n in sizes:
            entry = results["memory"][n]["ingest"]
            lines.append(f"| {int(n):,} | {entry['peak_rss_main_mb']} / {entry['peak_rss_largest_worker_mb']} | "
                         f"{entry['seconds']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=200, help="cohort size for the throughput part")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--memory-sizes", type=int, nargs="*", default=[1000, 3000])
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--output", type=Path, default=ROOT / "reports" / "bench" / "ingest_throughput.json")
    args = parser.parse_args()
    results = {"throughput": throughput(args.patients, args.repeats)}
    print(json.dumps(results["throughput"], indent=2), flush=True)
    if not args.skip_memory:
        results["memory"] = memory(args.memory_sizes, workers=0)
    target = args.output
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    target.with_suffix(".md").write_text(table)
    print(f"\n{table}\nwritten: {target} and {target.with_suffix('.md')}")


if __name__ == "__main__":
    main()
