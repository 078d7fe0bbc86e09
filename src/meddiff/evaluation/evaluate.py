"""The ``evaluate`` stage: is the model worth deploying? (proposal §3.6)

Writes ``reports/evaluate/``:

* ``metrics.json``: test metrics with bootstrap 95 % intervals (AUC-ROC macro and per class, F1,
  accuracy, balanced accuracy, ECE), the rare-disease and subgroup reports with fairness gaps, the
  robustness rows (the registry gate is the next stage, :mod:`meddiff.evaluation.promote`);
* ``robustness.csv``: one row per scenario × masking rate × imputation, with intervals;
* ``robustness_curve.csv`` (the DVC plot) and ``robustness.png`` (the same, for a person);
* ``test_probabilities.csv``: each test patient's class probabilities (the numbers every metric above is
  computed from; ``meddiff predict`` reproduces them from the raw files).

The evaluation is logged to MLflow as a child run of the training run.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meddiff.config import Params
from meddiff.data.dataset import ProcessedDataset, load_processed
from meddiff.evaluation import robustness, subgroups
from meddiff.intervals import bootstrap_ci
from meddiff.io import atomic_file, read_json, write_json
from meddiff.metrics import METRICS, auc_one_vs_rest
from meddiff.model.inference import predict_proba
from meddiff.model.multimodal import RUN_FILE, MedDiffModel

LOG = logging.getLogger(__name__)


@dataclass
class EvaluateResult:
    report_dir: str
    test_auc_macro: float
    test_auc_ci: tuple[float, float]
    test_f1_macro: float
    test_accuracy: float
    n_test: int
    robustness_auc: dict[str, float]


def model_predictor(model: MedDiffModel, seed: int) -> robustness.Predict:
    def predict(data: ProcessedDataset, index: np.ndarray, present: np.ndarray, impute: bool) -> np.ndarray:
        return predict_proba(model, data, index, present, impute_missing=impute, seed=seed)

    return predict


def test_metrics(y: np.ndarray, probs: np.ndarray, class_names: list[str], n_bootstrap: int, seed: int) -> dict:
    report = {name: bootstrap_ci(y, probs, fn, n_bootstrap, seed) for name, fn in METRICS.items()}
    report["auc_per_class"] = {
        name: bootstrap_ci(y, probs, lambda t, p, c=c: auc_one_vs_rest(t, p, c), n_bootstrap, seed)
        for c, name in enumerate(class_names)
    }
    report["n"] = len(y)
    return report


TEST_PROBABILITIES_FILE = "test_probabilities.csv"


def write_probabilities(target: Path, patient_ids: np.ndarray, probs: np.ndarray, class_names: list[str]) -> None:
    """``patient_id`` and one ``p_<class>`` column per class (full float precision), one row per patient."""
    with atomic_file(target) as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient_id", *(f"p_{name}" for name in class_names)])
        writer.writerows([pid, *(repr(float(p)) for p in row)] for pid, row in zip(patient_ids, probs, strict=True))


def imputation_options(model: MedDiffModel) -> list[bool]:
    """Rows without imputation, and with it when the model imputes and has a modality to impute from another (a
    one-modality model, e.g. EHR only, has nothing to impute: what it never had is never imputed)."""
    can_impute = model.spec.diffusion.impute_missing_latents and len(model.spec.modalities) > 1
    return [False, True] if can_impute else [False]


def write_robustness(rows: list[dict], report_dir: Path) -> None:
    with atomic_file(report_dir / "robustness.csv") as handle:
        writer = csv.DictWriter(handle, fieldnames=robustness.FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    curve: dict[float, dict] = {}
    for row in rows:
        if row["scenario"] == "random":
            key = "auc_with_imputation" if row["imputation"] else "auc_without_imputation"
            curve.setdefault(row["masking_rate"], {"masking_rate": row["masking_rate"]})[key] = row["auc_macro"]
    fields = ["masking_rate", "auc_without_imputation", *(["auc_with_imputation"] if any(
        r["imputation"] for r in rows) else [])]
    with atomic_file(report_dir / "robustness_curve.csv") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(curve[rate] for rate in sorted(curve))
    plot_robustness(rows, report_dir / "robustness.png")


def plot_robustness(rows: list[dict], target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120, gridspec_kw={"width_ratios": [3, 2]})
    for impute, style in ((False, "o-"), (True, "s--")):
        series = [r for r in rows if r["scenario"] == "random" and r["imputation"] == impute]
        if not series:
            continue
        x = [r["masked_fraction"] for r in series]
        left.plot(x, [r["auc_macro"] for r in series], style, label=f"imputation {'on' if impute else 'off'}")
        left.fill_between(x, [r["auc_ci_low"] for r in series], [r["auc_ci_high"] for r in series], alpha=0.15)
    left.set_xlabel("fraction of modality slots masked")
    left.set_ylabel("test AUC-ROC (macro), 95 % CI")
    left.set_ylim(0.4, 1.0)
    left.grid(alpha=0.3)
    left.legend(loc="lower left")
    left.set_title("Random masking")
    subsets = [r for r in rows if r["scenario"].startswith("subset_") and not r["imputation"] and r["n_patients"]]
    names = [r["scenario"].removeprefix("subset_").replace("tabular", "EHR") for r in subsets]
    values = [r["auc_macro"] for r in subsets]
    errors = [[v - r["auc_ci_low"] for v, r in zip(values, subsets, strict=True)],
              [r["auc_ci_high"] - v for v, r in zip(values, subsets, strict=True)]]
    right.barh(names, values, xerr=errors, capsize=3, color="#8da0cb")
    right.set_xlim(0.4, 1.0)
    right.set_title("Modalities shown (no imputation), 95 % CI")
    right.grid(alpha=0.3, axis="x")
    figure.tight_layout()
    with atomic_file(target, "wb") as handle:
        figure.savefig(handle, format="png")
    plt.close(figure)


def score_patients(
    params: Params, data: ProcessedDataset, index: np.ndarray, model: MedDiffModel,
    rare: list[int] | None = None,
) -> tuple[dict, np.ndarray]:
    """Every evaluation metric of ``model`` on the patients ``index`` of ``data`` (all labelled).

    Args:
        rare: the rare classes (indices); ``None`` = :func:`subgroups.rare_classes` of ``data``'s training
            split and ``evaluate.rare_classes`` (pass the training data's when ``data`` has no training split).

    Returns:
        ``(metrics, probs)``: the ``metrics.json`` object (``test``, ``rare``, ``subgroup``, ``robustness``; the
        key ``test`` names the patients scored, whichever split they are) and the (N, K) probabilities.
    """
    config = params.evaluate
    y = data.arrays["label"][index]
    probs = predict_proba(model, data, index)
    rare = subgroups.rare_classes(data, config.rare_classes) if rare is None else rare
    site = subgroups.minority_site(data, config.subgroup_site)
    metrics: dict = {
        "class_names": data.class_names,
        "test": test_metrics(y, probs, data.class_names, config.n_bootstrap, params.seed),
        "rare": subgroups.rare_report(y, probs, rare, data.class_names, config.n_bootstrap, params.seed),
        "subgroup": subgroups.subgroup_report(
            y, probs, data.arrays["site"][index], site, config.n_bootstrap, params.seed
        ),
    }
    metrics["robustness"] = robustness.robustness_sweep(
        model_predictor(model, params.seed), data, index, list(config.masking_rates), config.n_repeats,
        imputation_options(model), rare, config.n_bootstrap, params.seed,
    )
    return metrics, probs


def write_scores(
    params: Params, metrics: dict, data: ProcessedDataset, index: np.ndarray, probs: np.ndarray, model_dir: Path,
    report_dir: Path, run_name: str,
) -> None:
    """``metrics.json``, the probabilities, the robustness tables and plot into ``report_dir``; the same logged
    to MLflow as the child run ``run_name`` of the model's training run."""
    run_file = Path(model_dir) / RUN_FILE
    run = read_json(run_file) if run_file.is_file() else {}
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    write_json(report_dir / "metrics.json", metrics)
    write_probabilities(report_dir / TEST_PROBABILITIES_FILE, data.arrays["patient_id"][index], probs, data.class_names)
    write_robustness(metrics["robustness"], report_dir)
    _log_to_mlflow(params, run.get("mlflow_run_id"), metrics, report_dir, run_name)


def run_evaluate(params: Params, processed_dir: Path, model_dir: Path, report_dir: Path) -> EvaluateResult:
    data = load_processed(processed_dir)
    model = MedDiffModel.from_pretrained(model_dir)
    index = data.indices("test")
    if len(index) == 0:
        raise ValueError(f"{processed_dir}: the test split is empty")
    metrics, probs = score_patients(params, data, index, model)
    write_scores(params, metrics, data, index, probs, model_dir, report_dir, "evaluate")
    rows = metrics["robustness"]
    test = metrics["test"]
    return EvaluateResult(
        report_dir=str(report_dir),
        test_auc_macro=test["auc_macro"]["value"],
        test_auc_ci=(test["auc_macro"]["ci_low"], test["auc_macro"]["ci_high"]),
        test_f1_macro=test["f1_macro"]["value"],
        test_accuracy=test["accuracy"]["value"],
        n_test=len(index),
        robustness_auc={
            f"{r['masking_rate']:.2f}{'+imputation' if r['imputation'] else ''}": round(r["auc_macro"], 4)
            for r in rows if r["scenario"] == "random"
        },
    )


def _log_to_mlflow(params: Params, parent_run_id: str | None, metrics: dict, report_dir: Path, run_name: str) -> None:
    """Log the evaluation as a child run ``run_name`` of the training run that produced the model."""
    import mlflow

    from meddiff import tracking

    experiment_id = tracking.setup_experiment(params.tracking)
    tags = tracking.run_tags(params, None)
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags):
        flat = {f"test_{k}": v["value"] for k, v in metrics["test"].items() if isinstance(v, dict) and "value" in v}
        mlflow.log_metrics({k: v for k, v in flat.items() if np.isfinite(v)})
        random_rows = [r for r in metrics["robustness"] if r["scenario"] == "random" and not r["imputation"]]
        for step, row in enumerate(random_rows):
            mlflow.log_metric("robust_auc_macro", row["auc_macro"], step=step)
        mlflow.log_artifacts(str(report_dir), artifact_path=run_name)
