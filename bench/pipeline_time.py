"""Wall time of ``make run`` (a benchmark, not a test): the whole ``dvc repro`` on the built-in cohort.

Copies the checkout (tracked and untracked-but-not-ignored files, as a fresh clone would have them)
into a temporary folder, runs ``dvc repro`` there with this interpreter's environment and reads each
stage's own "finished in" line. The target (issue 10) is ≤ 300 s on 2 cores. To compare machines, a
matmul reference is timed in the same process: ``seconds × reference GFLOP/s`` is a machine-neutral
amount of work.

    python bench/pipeline_time.py [--output reports/bench/pipeline_time.json] [--set train.epochs=5 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_SECONDS = 300.0
FINISHED = re.compile(r"meddiff: (\w+) finished in ([0-9.]+) s")
#: matrix side and repetitions of the reference matmul
REFERENCE_SIDE, REFERENCE_REPEATS = 1024, 20


def matmul_gflops() -> float:
    """Achieved GFLOP/s of a float32 matmul on this machine (the same-process reference)."""
    import torch

    a, b = torch.randn(REFERENCE_SIDE, REFERENCE_SIDE), torch.randn(REFERENCE_SIDE, REFERENCE_SIDE)
    a @ b  # warm-up
    started = time.perf_counter()
    for _ in range(REFERENCE_REPEATS):
        a @ b
    seconds = time.perf_counter() - started
    return 2 * REFERENCE_SIDE**3 * REFERENCE_REPEATS / seconds / 1e9


def copy_checkout(target: Path) -> None:
    names = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    for name in filter(None, names):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(ROOT / "reports" / "bench" / "pipeline_time.json"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="params override applied to the copy's params.yaml (repeatable)")
    args = parser.parse_args(argv)
    reference = matmul_gflops()
    with tempfile.TemporaryDirectory(prefix="meddiff-pipeline-time-") as scratch:
        work = Path(scratch)
        copy_checkout(work)
        if args.overrides:
            sys.path.insert(0, str(ROOT / "src"))
            import yaml

            from meddiff.config import apply_overrides, load_params

            params = apply_overrides(load_params(work / "params.yaml"), args.overrides)
            (work / "params.yaml").write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))
        subprocess.run(["git", "init", "-q"], cwd=work, check=True)
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        env.pop("MLFLOW_TRACKING_URI", None)
        # the copy's own code, not the editable install's (an edit of the checkout mid-run must not change it)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(work / "src"), env.get("PYTHONPATH", "")]))
        started = time.perf_counter()
        completed = subprocess.run(["dvc", "repro"], cwd=work, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
    if completed.returncode != 0:
        print(completed.stdout[-3000:] + completed.stderr[-3000:], file=sys.stderr)
        return 1
    stages = {name: float(value) for name, value in FINISHED.findall(completed.stdout + completed.stderr)}
    result = {
        "seconds_total": round(seconds, 1),
        "seconds_per_stage": stages,
        "target_seconds": TARGET_SECONDS,
        "ratio_to_target": round(seconds / TARGET_SECONDS, 3),
        "reference_matmul_gflops": round(reference, 1),
        "work_gflop_equivalent": round(seconds * reference, 0),
        "cpus": os.cpu_count(),
        "load_average_1min_after": os.getloadavg()[0],
        "overrides": args.overrides,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
