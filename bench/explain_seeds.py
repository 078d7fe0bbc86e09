"""Issue 10's targets over training seeds: the full model's test AUC and what its explanations find.

For each seed the same processed data (same splits) trains the default model (``train`` with ``seed=<seed>``;
the diffusion refinement is skipped with ``train.diffusion.refine_epochs=0`` unless ``--keep-refine``: neither
the classifier nor the explanations depend on it), then ``evaluate`` and ``explain`` run on it as the stages
do. Per seed it keeps the test macro AUC (95 % bootstrap interval), the AUC without each modality, and per
explanation method the pointing game and Dice (top-k, Otsu) over all lesions and over visible ones
(contrast ≥ ``explain.visible_contrast_hu``), the modality rank correlation and the image deletion gap
(random − attributed, area under the curve). The table gives mean ± sd over seeds; every per-seed value
keeps its own interval in the JSON. Test patients' lesion masks are never used in training.

    python bench/explain_seeds.py --processed data/processed --seeds 42 43 44 --output reports/bench/explain_seeds
    python bench/explain_seeds.py ... --set explain.n_patients=64      # params overrides for every seed

Runs go to ``<output>/seed-<seed>/`` (model, reports, an MLflow store of their own) and are skipped when their
``summary.json`` exists, so an interrupted study resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
#: scores of one localisation subset kept per method
LOCALISATION_SCORES = ("pointing", "dice_topk", "dice_otsu", "iou_topk")


def _value(entry: dict[str, Any]) -> list[float]:
    """[value, ci_low, ci_high] of a metric entry with a bootstrap interval."""
    return [float(entry["value"]), float(entry["ci_low"]), float(entry["ci_high"])]


def summarise_run(evaluation: dict[str, Any], explanation: dict[str, Any]) -> dict[str, Any]:
    """The numbers issue 10 asks for, from one seed's ``evaluate`` and ``explain`` ``metrics.json``."""
    robustness = {row["scenario"]: row["auc_macro"] for row in evaluation["robustness"]
                  if row["scenario"].startswith("absent_") and not row["imputation"]}
    summary: dict[str, Any] = {
        "test_auc": _value(evaluation["test"]["auc_macro"]),
        "test_auc_per_class": {name: float(entry["value"])
                               for name, entry in evaluation["test"]["auc_per_class"].items()},
        "absent_auc": robustness,
        "shown_method": explanation["method"],
        "n_lesion_patients": explanation["n_patients"],
        "n_visible": explanation["n_visible"],
        "methods": {},
    }
    for method, scores in explanation["localisation"].items():
        entry: dict[str, Any] = {subset: {score: _value(scores[subset][score]) for score in LOCALISATION_SCORES}
                                 for subset in ("all", "visible") if subset in scores}
        faithfulness = explanation["faithfulness"].get(method)
        if faithfulness is not None:
            entry["modality_spearman"] = faithfulness["modality_agreement"]["spearman_per_patient"]
            entry["mean_share"] = faithfulness["mean_share"]
            image = faithfulness["deletion"].get("image")
            if image is not None:
                entry["image_deletion_gap"] = _value(image["random_minus_map"])
        summary["methods"][method] = entry
    return summary


def run_seed(params_path: Path, processed: Path, seed: int, output: Path, overrides: list[str],
             keep_refine: bool) -> dict[str, Any]:
    """Train, evaluate and explain one seed under ``output/seed-<seed>``; return its summary."""
    from meddiff.config import apply_overrides, load_params
    from meddiff.evaluation.evaluate import run_evaluate
    from meddiff.explain.report import run_explain
    from meddiff.training.train import run_train

    run_dir = output / f"seed-{seed}"
    done = run_dir / "summary.json"
    if done.exists():
        return json.loads(done.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    own = [f"seed={seed}", f"paths.checkpoints={run_dir / 'checkpoints'}",
           f"tracking.tracking_uri=sqlite:///{run_dir / 'mlruns.db'}",
           f"tracking.artifact_location={run_dir / 'mlartifacts'}"]
    if not keep_refine:
        own.append("train.diffusion.refine_epochs=0")
    params = apply_overrides(load_params(params_path), [*overrides, *own])
    started = time.perf_counter()
    run_train(params, processed, run_dir / "model")
    trained = time.perf_counter()
    run_evaluate(params, processed, run_dir / "model", run_dir / "evaluate")
    run_explain(params, processed, run_dir / "model", run_dir / "explain")
    summary = summarise_run(json.loads((run_dir / "evaluate" / "metrics.json").read_text()),
                            json.loads((run_dir / "explain" / "metrics.json").read_text()))
    summary.update(seed=seed, overrides=overrides, train_seconds=trained - started,
                   total_seconds=time.perf_counter() - started)
    done.write_text(json.dumps(summary, indent=2))
    return summary


def _mean_sd(values: list[float]) -> str:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "n/a"
    return f"{np.mean(finite):.3f} ± {np.std(finite, ddof=1) if len(finite) > 1 else 0.0:.3f}"


def table(summaries: list[dict[str, Any]]) -> str:
    """Markdown: mean ± sd over seeds of every number of :func:`summarise_run`, then each seed with intervals."""
    lines = [f"Seeds: {[s['seed'] for s in summaries]}; overrides: {summaries[0]['overrides']}", "",
             "| quantity | mean ± sd over seeds |", "|---|---|",
             f"| test macro AUC | {_mean_sd([s['test_auc'][0] for s in summaries])} |"]
    for scenario in summaries[0]["absent_auc"]:
        lines.append(f"| test AUC, {scenario} | {_mean_sd([s['absent_auc'][scenario] for s in summaries])} |")
    for name in summaries[0]["test_auc_per_class"]:
        lines.append(f"| test AUC {name} | {_mean_sd([s['test_auc_per_class'][name] for s in summaries])} |")
    for method, entry in summaries[0]["methods"].items():
        for subset in ("all", "visible"):
            for score in LOCALISATION_SCORES if subset in entry else ():
                values = [s["methods"][method][subset][score][0] for s in summaries]
                lines.append(f"| {method} {subset} {score} | {_mean_sd(values)} |")
        if "modality_spearman" in entry:
            lines.append(f"| {method} modality rank correlation | "
                         f"{_mean_sd([s['methods'][method]['modality_spearman'] for s in summaries])} |")
        if "image_deletion_gap" in entry:
            lines.append(f"| {method} image deletion gap (random − map) | "
                         f"{_mean_sd([s['methods'][method]['image_deletion_gap'][0] for s in summaries])} |")
    lines += ["", "Per seed (95 % bootstrap intervals):", ""]
    for s in summaries:
        auc = s["test_auc"]
        shown = s["methods"][s["shown_method"]]
        visible = shown.get("visible", shown["all"])
        lines.append(f"- seed {s['seed']}: test AUC {auc[0]:.3f} [{auc[1]:.3f}, {auc[2]:.3f}]; {s['shown_method']} "
                     f"visible pointing {visible['pointing'][0]:.2f} [{visible['pointing'][1]:.2f}, "
                     f"{visible['pointing'][2]:.2f}], Dice top-k {visible['dice_topk'][0]:.3f} "
                     f"[{visible['dice_topk'][1]:.3f}, {visible['dice_topk'][2]:.3f}] "
                     f"(n = {s['n_visible']} visible of {s['n_lesion_patients']}); train {s['train_seconds']:.0f} s")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--processed", type=Path, default=ROOT / "data" / "processed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--output", type=Path, default=ROOT / "reports" / "bench" / "explain_seeds")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], help="params overrides (key=value)")
    parser.add_argument("--keep-refine", action="store_true", help="also run the diffusion refinement")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summaries = [run_seed(args.params, args.processed, seed, args.output, args.overrides, args.keep_refine)
                 for seed in args.seeds]
    text = table(summaries)
    (args.output / "explain_seeds.md").write_text(text)
    (args.output / "explain_seeds.json").write_text(json.dumps(summaries, indent=2))
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
