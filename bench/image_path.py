"""The image path over seeds (issue 10): image-only vs the hand-made-feature logistic regression, and the full
model vs the best unimodal model, each fitted with several training seeds on the same processed data.

Per (variant, seed): the best-validation model of the suite's harness (:func:`meddiff.training.fit.fit`
with the suite's overrides and ``seed=<seed>``; the splits stay those of the processed data), its
validation and test macro AUC with 95 % bootstrap intervals, test AUC per class, CPU seconds per epoch.
``feature_lr`` (:mod:`meddiff.evaluation.feature_baseline`) is deterministic up to the solver and fitted
once per seed as well. Selection is on validation only; test is reported, never used to choose.

    python bench/image_path.py run --processed data/processed --variants image_only full --seeds 42 43 44 \\
        --output reports/bench/image_path
    python bench/image_path.py table --output reports/bench/image_path     # image_path.md + .json
    python bench/image_path.py run --variants image_only --set train.lambda_seg=1 \
        train.model.image_pooling=lesion --output /tmp/seg_lesion     # a recipe variant (params overrides)

Each run is written to ``<output>/runs/<variant>-<seed>.json`` as soon as it finishes (rerunning skips
finished runs), so several processes can share the work on a loaded machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("image_only", "text_only", "tabular_only", "full", "feature_lr")
UNIMODAL = ("image_only", "text_only", "tabular_only")


def _metrics(data, index: np.ndarray, probs: np.ndarray, n_bootstrap: int, seed: int) -> dict:
    from meddiff.evaluation.evaluate import test_metrics

    report = test_metrics(data.arrays["label"][index], probs, data.class_names, n_bootstrap, seed)
    return {"auc": report["auc_macro"], "auc_per_class": report["auc_per_class"], "n": report["n"]}


def run_one(params_path: Path, processed: Path, variant: str, seed: int, output: Path, threads: int,
            overrides: list[str] | None = None) -> dict:
    import torch

    from meddiff.config import apply_overrides, load_params
    from meddiff.data.dataset import load_processed
    from meddiff.evaluation.suite import TRAINED_VARIANTS

    torch.set_num_threads(threads)
    data = load_processed(processed)
    params = apply_overrides(load_params(params_path),
                             [*(overrides or []), f"seed={seed}", f"train.num_threads={threads}"])
    started_cpu, started = time.process_time(), time.perf_counter()
    record: dict = {"variant": variant, "seed": seed, "overrides": list(overrides or [])}
    if variant == "feature_lr":
        from meddiff.evaluation.feature_baseline import fit_feature_baseline

        model = fit_feature_baseline(data, seed)
        predict = lambda index: model.predict_proba(data, index, data.arrays["modality_present"][index])  # noqa: E731
        record.update(c=model.c, epochs_run=0, cpu_s_per_epoch=float("nan"))
    else:
        from meddiff.model.inference import predict_proba
        from meddiff.training.fit import fit

        variant_params = apply_overrides(params, TRAINED_VARIANTS[variant])
        result = fit(variant_params, data, output / "checkpoints" / f"{variant}-{seed}")
        fitted = result.model
        predict = lambda index: predict_proba(fitted, data, index)  # noqa: E731
        history = result.state.history
        record.update(best_epoch=result.state.best_epoch, epochs_run=len(history),
                      val_history=[round(h["val_auc_macro"], 4) for h in history])
    cpu = time.process_time() - started_cpu
    record.update(cpu_s=round(cpu, 1), wall_s=round(time.perf_counter() - started, 1))
    if record["epochs_run"]:
        record["cpu_s_per_epoch"] = round(cpu / record["epochs_run"], 2)  # includes validation and refinement
    for split in ("val", "test"):
        index = data.indices(split)
        record[split] = _metrics(data, index, predict(index), params.evaluate.n_bootstrap, seed)
    (output / "runs").mkdir(parents=True, exist_ok=True)
    (output / "runs" / f"{variant}-{seed}.json").write_text(json.dumps(record, indent=1))
    return record


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.3f}"


def _ci(metric: dict) -> str:
    return f"{metric['value']:.3f} [{metric['ci_low']:.3f}, {metric['ci_high']:.3f}]"


def table(output: Path) -> str:
    runs = [json.loads(p.read_text()) for p in sorted((output / "runs").glob("*.json"))]
    by_variant: dict[str, list[dict]] = {}
    for run in runs:
        by_variant.setdefault(run["variant"], []).append(run)
    classes = list(runs[0]["test"]["auc_per_class"]) if runs else []
    lines = ["# Image path over seeds (bench/image_path.py)", "",
             "Macro AUC, one-vs-rest; mean ± sd over seeds, then each seed's value with its 95 % bootstrap "
             "interval. Best epoch chosen on validation.", "",
             "| variant | seeds | val AUC | test AUC | per seed: test AUC [95 % CI] | test AUC per class "
             f"({' / '.join(classes)}) | CPU s/epoch |", "|---|---|---|---|---|---|---|"]
    summary: dict[str, dict] = {}
    for variant in [v for v in VARIANTS if v in by_variant]:
        group = sorted(by_variant[variant], key=lambda r: r["seed"])
        val = [r["val"]["auc"]["value"] for r in group]
        test = [r["test"]["auc"]["value"] for r in group]
        per_class = {c: float(np.nanmean([r["test"]["auc_per_class"][c]["value"] for r in group])) for c in classes}
        cpu = [r["cpu_s_per_epoch"] for r in group if isinstance(r.get("cpu_s_per_epoch"), float)
               and math.isfinite(r["cpu_s_per_epoch"])]
        summary[variant] = {"seeds": [r["seed"] for r in group], "val_mean": float(np.mean(val)),
                            "test_mean": float(np.mean(test)), "test_sd": float(np.std(test, ddof=1)) if len(test) > 1
                            else 0.0, "test_per_class_mean": per_class}
        lines.append(f"| {variant} | {len(group)} | {_mean_sd(val)} | {_mean_sd(test)} | "
                     + "; ".join(_ci(r["test"]["auc"]) for r in group) + " | "
                     + " / ".join(f"{v:.2f}" for v in per_class.values()) + f" | {_mean_sd(cpu) if cpu else '-'} |")
    unimodal = {v: summary[v]["test_mean"] for v in UNIMODAL if v in summary}
    if "full" in summary and unimodal:
        best = max(unimodal, key=unimodal.get)
        gain = summary["full"]["test_mean"] - unimodal[best]
        lines += ["", f"Full vs best unimodal ({best}): {summary['full']['test_mean']:.3f} vs {unimodal[best]:.3f} "
                  f"(gain {gain:+.3f}; target +0.05)."]
    if "image_only" in summary and "feature_lr" in summary:
        lines += [f"Image-only vs feature LR: {summary['image_only']['test_mean']:.3f} vs "
                  f"{summary['feature_lr']['test_mean']:.3f} (target: image-only ≥ 0.80 and ≥ the LR)."]
    text = "\n".join(lines) + "\n"
    (output / "image_path.md").write_text(text)
    (output / "image_path.json").write_text(json.dumps({"summary": summary, "runs": runs}, indent=1))
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["run", "table"])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--processed", type=Path, default=ROOT / "data" / "processed")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=ROOT / "reports" / "bench" / "image_path")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="params overrides for every variant of this run (e.g. train.lambda_seg=1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.command == "run":
        for seed in args.seeds:
            for variant in args.variants:
                if (args.output / "runs" / f"{variant}-{seed}.json").is_file():
                    continue
                record = run_one(args.params, args.processed, variant, seed, args.output, args.threads, args.set)
                print(json.dumps({k: record[k] for k in ("variant", "seed", "cpu_s")} | {
                    "val_auc": record["val"]["auc"]["value"], "test_auc": record["test"]["auc"]["value"]}),
                    flush=True)
    print(table(args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
