"""The ``evaluate`` stage: test-split metrics and robustness to missing modalities (proposal §3.6).

For each masking rate r in params, every modality a test patient has is masked independently with
probability r, keeping at least one (the training masking rule, :func:`sample_modality_mask`);
metrics are averaged over ``n_repeats`` random masks. Because at least one modality is always kept,
the fraction of (patient, modality) slots actually masked is below r at high rates; it is reported
as ``masked_fraction`` beside the requested rate.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from meddiff.config import Params
from meddiff.data.dataset import load_processed
from meddiff.evaluation.metrics import classification_metrics
from meddiff.io import atomic_file, read_json, write_json
from meddiff.model.inference import predict_proba
from meddiff.training.checkpoint import load_model
from meddiff.training.masking import sample_modality_mask
from meddiff.training.train import RUN_FILE

LOG = logging.getLogger(__name__)
ROBUSTNESS_FIELDS = ("masking_rate", "masked_fraction", "auc_macro", "auc_macro_std", "f1_macro", "accuracy")


@dataclass
class EvaluateResult:
    report_dir: str
    test_auc_macro: float
    test_f1_macro: float
    test_accuracy: float
    n_test: int
    robustness_auc: dict[str, float]


def robustness_sweep(model, data, index: np.ndarray, rates: list[float], repeats: int, seed: int) -> list[dict]:
    """Metrics per masking rate, averaged over ``repeats`` random masks of the test patients."""
    labels = data.arrays["label"][index]
    present = torch.from_numpy(data.arrays["modality_present"][index].astype(bool))
    rows = []
    for rate_index, rate in enumerate(rates):
        generator = torch.Generator().manual_seed(seed + rate_index)
        aucs, f1s, accs, fractions = [], [], [], []
        for _ in range(repeats):
            used = sample_modality_mask(present, rate, generator)
            masked_fraction = float((present & ~used).sum()) / float(present.sum())
            metrics = classification_metrics(labels, predict_proba(model, data, index, used.numpy()))
            aucs.append(metrics["auc_macro"])
            f1s.append(metrics["f1_macro"])
            accs.append(metrics["accuracy"])
            fractions.append(masked_fraction)
        rows.append({
            "masking_rate": rate,
            "masked_fraction": round(float(np.mean(fractions)), 4),
            "auc_macro": float(np.mean(aucs)),
            "auc_macro_std": float(np.std(aucs)),
            "f1_macro": float(np.mean(f1s)),
            "accuracy": float(np.mean(accs)),
        })
        LOG.info("masking rate %.1f: AUC %.3f (masked %.2f of slots)", rate, rows[-1]["auc_macro"], masked_fraction)
    return rows


def plot_robustness(rows: list[dict], target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [r["masking_rate"] for r in rows]
    auc = np.array([r["auc_macro"] for r in rows])
    std = np.array([r["auc_macro_std"] for r in rows])
    figure, axis = plt.subplots(figsize=(5, 3.5), dpi=120)
    axis.plot(rates, auc, marker="o", label="AUC-ROC (macro)")
    axis.fill_between(rates, auc - std, auc + std, alpha=0.2)
    axis.plot(rates, [r["f1_macro"] for r in rows], marker="s", label="F1 (macro)")
    axis.set_xlabel("modality masking rate")
    axis.set_ylabel("test metric")
    axis.set_ylim(0, 1.02)
    axis.grid(alpha=0.3)
    axis.legend(loc="lower left")
    axis.set_title("Robustness to missing modalities")
    figure.tight_layout()
    with atomic_file(target, "wb") as handle:
        figure.savefig(handle, format="png")
    plt.close(figure)


def run_evaluate(params: Params, processed_dir: Path, model_dir: Path, report_dir: Path) -> EvaluateResult:
    data = load_processed(processed_dir)
    model = load_model(model_dir)
    index = data.indices("test")
    if len(index) == 0:
        raise ValueError(f"{processed_dir}: the test split is empty")
    test = classification_metrics(data.arrays["label"][index], predict_proba(model, data, index))
    rows = robustness_sweep(
        model, data, index, list(params.evaluate.masking_rates), params.evaluate.n_repeats, params.seed
    )
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    metrics = {"class_names": data.class_names, "test": test, "robustness": rows}
    write_json(report_dir / "metrics.json", metrics)
    with atomic_file(report_dir / "robustness.csv") as handle:
        writer = csv.DictWriter(handle, fieldnames=ROBUSTNESS_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    plot_robustness(rows, report_dir / "robustness.png")
    _log_to_mlflow(params, model_dir, test, rows, report_dir)
    return EvaluateResult(
        report_dir=str(report_dir),
        test_auc_macro=test["auc_macro"],
        test_f1_macro=test["f1_macro"],
        test_accuracy=test["accuracy"],
        n_test=len(index),
        robustness_auc={f"{r['masking_rate']:.1f}": round(r["auc_macro"], 4) for r in rows},
    )


def _log_to_mlflow(params: Params, model_dir: Path, test: dict, rows: list[dict], report_dir: Path) -> None:
    """Log the evaluation as a child run of the training run that produced the model."""
    import mlflow

    from meddiff import tracking

    run_file = Path(model_dir) / RUN_FILE
    parent = read_json(run_file)["mlflow_run_id"] if run_file.is_file() else None
    experiment_id = tracking.setup_experiment(params.tracking)
    tags = tracking.run_tags(params, None)
    if parent:
        tags["mlflow.parentRunId"] = parent
    with mlflow.start_run(experiment_id=experiment_id, run_name="evaluate", tags=tags):
        mlflow.log_metrics({f"test_{k}": v for k, v in test.items() if isinstance(v, float) and np.isfinite(v)})
        for step, row in enumerate(rows):
            mlflow.log_metrics({"robust_auc_macro": row["auc_macro"], "robust_f1_macro": row["f1_macro"]}, step=step)
        mlflow.log_artifacts(str(report_dir), artifact_path="evaluate")
