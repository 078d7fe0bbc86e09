"""Peak resident memory of the data stages and of one training epoch at two cohort sizes (issue 14).

For each size (default 1,000 and 10,000 patients) it runs ``meddiff cohort``, ``ingest``, ``preprocess`` and
one training epoch, each in a fresh measuring process: that process starts the stage as its child, waits
for it and reads ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` (the largest resident set of the stage
process or of any worker process it waited for; the measuring process starts nothing else, so nothing of an
earlier measurement is in it). Nothing is extrapolated. The result is the ratio of the peak at the large
size to the peak at the small one, per stage (target ≤ :data:`TARGET_RATIO`), and the data-loading share
of the training step time: the time spent producing batches (gathering rows from the processed shards,
converting to tensors) over the time of the training loop.

    python bench/memory.py [--sizes 1000 10000] [--stages cohort ingest preprocess train_epoch]
        [--root /tmp/meddiff-memory] [--output reports/bench/memory.json]

Data go under ``--root/<size>/`` (about 1-2 GB at 10,000 patients) and stay there: ``--stages`` re-measures
some stages on data already made (the later stages need the earlier ones' outputs), keeping the other
entries of ``--output``. Writes the JSON and a Markdown table beside it (``memory.md``). Stages run with the
repository's ``params.yaml``; the image cache is off (``preprocess.cache_dir=null``), so preprocess runs
every image.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "reports" / "bench" / "memory.json"
SIZES = (1000, 10000)
STAGES = ("cohort", "ingest", "preprocess", "train_epoch")
#: target: peak at the large size ≤ this × the peak at the small size, for every stage
TARGET_RATIO = 1.5
KIB_PER_MIB = 1024


def stage_overrides(n_patients: int, folder: Path, image_cache: bool = False) -> list[str]:
    """``--set`` values putting every folder of a run of ``n_patients`` under ``folder`` (the image cache too,
    when ``image_cache``; else it is off)."""
    return [
        f"cohort.n_patients={n_patients}", f"paths.raw={folder}/raw", f"paths.interim={folder}/interim",
        f"paths.quarantine={folder}/quarantine", f"paths.reports={folder}/reports",
        f"paths.processed={folder}/processed", f"paths.checkpoints={folder}/checkpoints",
        f"preprocess.cache_dir={folder / 'cache' if image_cache else 'null'}", "train.epochs=1",
    ]


def stage_command(stage: str, n_patients: int, root: Path, params: Path, image_cache: bool = False,
                  train_steps: int | None = None) -> list[str]:
    folder = root / str(n_patients)
    sets = [arg for value in stage_overrides(n_patients, folder, image_cache) for arg in ("--set", value)]
    if stage == "train_epoch":
        limit = ["--max-steps", str(train_steps)] if train_steps else []
        return [sys.executable, __file__, "--train-epoch", str(folder / "train_epoch.json"), "--params",
                str(params), *limit, *sets]
    return [sys.executable, "-m", "meddiff.cli", stage, "--params", str(params), *sets]


def measure(command: list[str], log: Path) -> dict[str, Any]:
    """Run ``command`` under a fresh measuring process; its peak RSS (MiB), wall seconds and exit status."""
    log.parent.mkdir(parents=True, exist_ok=True)
    probe = subprocess.run([sys.executable, __file__, "--measure", str(log), "--", *command],
                           capture_output=True, text=True, check=False, cwd=ROOT)
    if probe.returncode != 0:
        raise RuntimeError(f"measuring {command} failed: {probe.stderr[-2000:]}")
    return json.loads(probe.stdout)


def _measure_child(log: Path, command: list[str]) -> int:
    """The measuring process: run ``command`` (output to ``log``), print its peak RSS as JSON."""
    started = time.perf_counter()
    with open(log, "w") as handle:
        returncode = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, check=False, cwd=ROOT).returncode
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # ru_maxrss in KiB on Linux
    print(json.dumps({"max_rss_mib": round(usage.ru_maxrss / KIB_PER_MIB, 1),
                      "seconds": round(time.perf_counter() - started, 1), "returncode": returncode}))
    return 0


def _train_epoch(result_file: Path, params_file: Path, overrides: list[str], max_steps: int | None) -> int:
    """One training epoch on the processed data of ``overrides``' folders, timing batch production; with
    ``max_steps``, only its first ``max_steps`` steps (recorded as a partial epoch)."""
    import tempfile

    from meddiff.config import apply_overrides, load_params
    from meddiff.data.dataset import load_processed
    from meddiff.training import loop

    params = apply_overrides(load_params(params_file), overrides)
    started = time.perf_counter()
    data = load_processed(params.paths.processed)
    timing = {"data_seconds": 0.0, "loop_seconds": 0.0, "steps": 0}
    produce = loop.iterate_batches

    def timed_batches(*args: Any, **kwargs: Any) -> Iterator[Any]:
        batches = produce(*args, **kwargs)
        loop_started = time.perf_counter()
        try:
            while True:
                asked = time.perf_counter()
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                timing["data_seconds"] += time.perf_counter() - asked
                timing["steps"] += 1
                yield batch
        finally:
            timing["loop_seconds"] += time.perf_counter() - loop_started

    loop.iterate_batches = timed_batches  # the training loop's batches only (validation batches are not timed)
    timing["partial_epoch"] = False
    with tempfile.TemporaryDirectory() as checkpoints:
        try:
            loop.train_model(params, data, Path(checkpoints), stop_after_steps=max_steps)
        except loop.TrainingInterruptedError:
            timing["partial_epoch"] = True
    timing["data_share"] = timing["data_seconds"] / timing["loop_seconds"] if timing["loop_seconds"] else None
    timing["n_train"] = len(data.indices("train"))
    timing["epoch_seconds"] = round(time.perf_counter() - started, 1)
    result_file.write_text(json.dumps(timing, indent=2))
    return 0


def _ratios(stages: dict[str, dict[str, Any]], small: int, large: int) -> dict[str, Any]:
    out = {}
    for stage, by_size in stages.items():
        if str(small) in by_size and str(large) in by_size:
            ratio = by_size[str(large)]["max_rss_mib"] / by_size[str(small)]["max_rss_mib"]
            out[stage] = {"ratio": round(ratio, 2), "meets_target": ratio <= TARGET_RATIO}
    return out


def markdown(result: dict[str, Any]) -> str:
    small, large = result["sizes"]
    lines = [f"Peak RSS (MiB, `bench/memory.py`; target: {large:,} ÷ {small:,} patients ≤ {TARGET_RATIO}×)", "",
             f"| stage | {small:,} patients | {large:,} patients | ratio | seconds ({small:,} / {large:,}) |",
             "|---|---|---|---|---|"]
    for stage in STAGES:
        by_size = result["stages"].get(stage, {})
        peaks = [f"{by_size[str(n)]['max_rss_mib']:.0f}" if str(n) in by_size else "—" for n in (small, large)]
        seconds = " / ".join(f"{by_size[str(n)]['seconds']:.0f}" if str(n) in by_size else "—" for n in (small, large))
        ratio = result["ratios"].get(stage, {}).get("ratio")
        lines.append(f"| {stage} | {peaks[0]} | {peaks[1]} | {'—' if ratio is None else f'{ratio:.2f}×'} | {seconds} |")
    shares = result.get("data_loading_share", {})
    if shares:
        lines += ["", "Data-loading share of the training step time: " + ", ".join(
            f"{float(share):.1%} at {int(n):,} patients" for n, share in shares.items() if share is not None)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--measure"]:
        return _measure_child(Path(argv[1]), argv[3:])
    if argv[:1] == ["--train-epoch"]:
        sets = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--set"]
        max_steps = int(argv[argv.index("--max-steps") + 1]) if "--max-steps" in argv else None
        return _train_epoch(Path(argv[1]), Path(argv[argv.index("--params") + 1]), sets, max_steps)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=list(SIZES), metavar=("SMALL", "LARGE"))
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--root", type=Path, default=Path("/tmp/meddiff-memory"))
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--only-size", type=int, default=None, help="measure this one of --sizes only")
    parser.add_argument("--image-cache", action="store_true",
                        help="preprocess with its MONAI image cache (under --root/<size>/cache, cold at the start)")
    parser.add_argument("--train-steps", type=int, default=None,
                        help="stop the training epoch after this many steps (a partial epoch, recorded as such)")
    args = parser.parse_args(argv)

    previous = json.loads(args.output.read_text()) if args.output.is_file() else {}
    keep = previous.get("sizes") == args.sizes
    result: dict[str, Any] = {
        "sizes": args.sizes, "stages": previous.get("stages", {}) if keep else {},
        "data_loading_share": previous.get("data_loading_share", {}) if keep else {},
        "training": previous.get("training", {}) if keep else {},
    }
    for n in ([args.only_size] if args.only_size else args.sizes):
        for stage in args.stages:
            folder = args.root / str(n)
            command = stage_command(stage, n, args.root, args.params, args.image_cache, args.train_steps)
            entry = measure(command, folder / f"{stage}.log")
            entry["image_cache"] = args.image_cache
            entry["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
            print(f"{stage} at {n} patients: {entry}", file=sys.stderr)
            if entry["returncode"] != 0:
                raise RuntimeError(f"{stage} at {n} patients failed; see {folder / f'{stage}.log'}")
            result["stages"].setdefault(stage, {})[str(n)] = entry
            if stage == "train_epoch":
                timing = json.loads((folder / "train_epoch.json").read_text())
                result["training"][str(n)] = timing
                result["data_loading_share"][str(n)] = timing["data_share"]
            _write(result, args.output)  # after every measurement: a later failure keeps the earlier ones
    _write(result, args.output)
    print(markdown(result))
    return 0


def _write(result: dict[str, Any], output: Path) -> None:
    result["ratios"] = _ratios(result["stages"], *result["sizes"])
    result["target_ratio"] = TARGET_RATIO
    result["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform()}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    output.with_suffix(".md").write_text(markdown(result))


if __name__ == "__main__":
    sys.exit(main())
