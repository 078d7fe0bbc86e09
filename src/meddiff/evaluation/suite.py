"""Ablations and baselines (proposal §3.6): same data, same training budget, same harness.

Every model below is trained on the same training split for the same number of epochs (params
``evaluate.suite_epochs``, default ``train.epochs``, with the same early stopping) and evaluated by
the same code as the ``evaluate`` stage: test metrics with bootstrap intervals and the random
masking sweep.

Ablations of the proposed model ("full"):
  ``no_masking`` (p = 0), ``concat_fusion`` (concatenation instead of cross-attention),
  ``classifier_only`` (no diffusion and no reconstruction loss), ``no_ontology`` (no RadLex prior),
  ``no_imputation`` (the full model, missing latents not inpainted).
Baselines:
  ``image_only`` / ``text_only`` / ``tabular_only`` (the same architecture restricted to one
  modality), ``late_fusion`` (average of the unimodal models' probabilities over the modalities a
  patient has), ``diffmic`` (an image-only diffusion classifier, DiffMIC-style), ``feature_lr`` (a
  logistic regression on hand-made image features, :mod:`.feature_baseline`: the bar ``image_only``
  must clear; not trained for epochs, its regularisation chosen on validation).

Writes ``suite.json``, ``suite.md``, ``suite.html`` and ``summary.md`` (the proposal's headline
comparisons) into the evaluate report folder, and logs the table to MLflow.
"""

from __future__ import annotations

import html
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meddiff import MODALITIES
from meddiff.config import Params, apply_overrides
from meddiff.data.dataset import ProcessedDataset, load_processed
from meddiff.evaluation import robustness, subgroups
from meddiff.evaluation.evaluate import model_predictor, test_metrics
from meddiff.io import atomic_file, write_json

LOG = logging.getLogger(__name__)

TRAINED_VARIANTS: dict[str, list[str]] = {
    "full": [],
    "no_masking": ["train.modality_dropout_p=0.0"],
    "concat_fusion": ["train.model.fusion=concat"],
    "classifier_only": ["train.lambda_diff=0.0", "train.lambda_recon=0.0", "train.diffusion.refine_epochs=0"],
    "no_ontology": ["train.model.ontology_attention=false"],
    "image_only": ["train.modalities=[image]"],
    "text_only": ["train.modalities=[text]"],
    "tabular_only": ["train.modalities=[tabular]"],
}
DERIVED_VARIANTS = {
    "no_imputation": ["full"],
    "late_fusion": ["image_only", "text_only", "tabular_only"],
    "diffmic": [],
    "feature_lr": [],
}
KNOWN = set(TRAINED_VARIANTS) | set(DERIVED_VARIANTS)
UNIMODAL = ("image_only", "text_only", "tabular_only")


@dataclass
class SuiteResult:
    report_dir: str
    variants: list[str]
    table: list[dict]


def _needed(requested: list[str]) -> list[str]:
    unknown = set(requested) - KNOWN
    if unknown:
        raise ValueError(f"evaluate.suite names unknown variants {sorted(unknown)}; known: {sorted(KNOWN)}")
    needed = [v for v in TRAINED_VARIANTS if v in requested]
    for derived in requested:
        for dependency in DERIVED_VARIANTS.get(derived, []):
            if dependency not in needed:
                needed.append(dependency)
    return needed


def _late_fusion(predictors: dict[str, robustness.Predict]) -> robustness.Predict:
    def predict(data: ProcessedDataset, index: np.ndarray, present: np.ndarray, impute: bool) -> np.ndarray:
        parts, weights = [], []
        for m, name in enumerate(MODALITIES):
            parts.append(predictors[f"{name}_only"](data, index, present, False))
            weights.append(present[:, m].astype(float))
        stacked, w = np.stack(parts), np.stack(weights)[..., None]  # (3, N, K), (3, N, 1)
        return (stacked * w).sum(0) / np.clip(w.sum(0), 1.0, None)

    return predict


def _diffmic_predictor(params: Params, data: ProcessedDataset, epochs: int) -> robustness.Predict:
    from meddiff.evaluation.diffmic import predict_proba_diffmic, train_diffmic

    model = train_diffmic(
        data,
        epochs=epochs,
        batch_size=params.train.batch_size,
        learning_rate=params.train.learning_rate,
        d_model=params.train.model.d_model,
        image_channels=list(params.train.model.image_channels),
        num_train_timesteps=params.train.diffusion.num_train_timesteps,
        seed=params.seed,
    )
    train_labels = data.arrays["label"][data.indices("train")]
    prior = np.bincount(train_labels, minlength=data.n_classes) / len(train_labels)

    def predict(data: ProcessedDataset, index: np.ndarray, present: np.ndarray, impute: bool) -> np.ndarray:
        probs = np.tile(prior, (len(index), 1))
        with_image = present[:, MODALITIES.index("image")]
        if with_image.any():
            probs[with_image] = predict_proba_diffmic(model, data, index[with_image], seed=params.seed)
        return probs

    return predict


def _feature_lr_predictor(params: Params, data: ProcessedDataset) -> robustness.Predict:
    from meddiff.evaluation.feature_baseline import fit_feature_baseline

    model = fit_feature_baseline(data, params.seed)
    LOG.info("suite: feature_lr C=%s, validation macro AUC %.3f", model.c, model.val_auc)

    def predict(data: ProcessedDataset, index: np.ndarray, present: np.ndarray, impute: bool) -> np.ndarray:
        return model.predict_proba(data, index, present)

    return predict


def _row(name: str, rows: list[dict], test: dict) -> dict:
    by_rate = {r["masking_rate"]: r for r in rows if r["scenario"] == "random"}
    row = {
        "variant": name,
        "auc": test["auc_macro"]["value"],
        "auc_ci": [test["auc_macro"]["ci_low"], test["auc_macro"]["ci_high"]],
        "f1": test["f1_macro"]["value"],
        "accuracy": test["accuracy"]["value"],
    }
    for rate, r in sorted(by_rate.items()):
        row[f"auc@{rate:.1f}"] = r["auc_macro"]
        row[f"auc_ci@{rate:.1f}"] = [r["auc_ci_low"], r["auc_ci_high"]]
        row[f"rare_auc@{rate:.1f}"] = r["rare_auc"]
    return row


def run_suite(params: Params, processed_dir: Path, report_dir: Path) -> SuiteResult:
    from meddiff.training.fit import fit
    from meddiff.training.train import data_digest, run_key

    config = params.evaluate
    epochs = config.suite_epochs or params.train.epochs
    data = load_processed(processed_dir)
    index = data.indices("test")
    rare = subgroups.rare_classes(data, config.rare_classes)
    y = data.arrays["label"][index]
    data_md5 = data_digest(processed_dir)
    predictors: dict[str, robustness.Predict] = {}
    imputation: dict[str, bool] = {}
    for variant in _needed(config.suite):
        variant_params = apply_overrides(params, [f"train.epochs={epochs}", *TRAINED_VARIANTS[variant]])
        LOG.info("suite: training %s for up to %d epochs", variant, epochs)
        key = run_key(variant_params, data_md5)
        checkpoint_dir = Path(params.paths.checkpoints) / "suite" / f"{variant}-{key}"
        model = fit(variant_params, data, checkpoint_dir).model
        predictors[variant] = model_predictor(model, params.seed)
        imputation[variant] = model.spec.diffusion.impute_missing_latents and variant_params.train.lambda_diff > 0
    if "no_imputation" in config.suite:
        predictors["no_imputation"] = predictors["full"]
        imputation["no_imputation"] = False
    if "late_fusion" in config.suite:
        predictors["late_fusion"] = _late_fusion(predictors)
        imputation["late_fusion"] = False
    if "diffmic" in config.suite:
        predictors["diffmic"] = _diffmic_predictor(params, data, epochs)
        imputation["diffmic"] = False
    if "feature_lr" in config.suite:
        predictors["feature_lr"] = _feature_lr_predictor(params, data)
        imputation["feature_lr"] = False

    table, details = [], {}
    for variant in config.suite:
        predict = predictors[variant]
        full_mask = data.arrays["modality_present"][index]
        probs = predict(data, index, full_mask, imputation[variant])
        test = test_metrics(y, probs, data.class_names, config.n_bootstrap, params.seed)
        rows = robustness.robustness_sweep(
            predict, data, index, list(config.masking_rates), config.n_repeats, [imputation[variant]], rare,
            config.n_bootstrap, params.seed, model_name=variant,
        )
        table.append(_row(variant, rows, test))
        details[variant] = {"test": test, "robustness": rows, "imputation": imputation[variant]}

    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    rare_names = [data.class_names[c] for c in rare]
    write_json(report_dir / "suite.json", {"epochs": epochs, "rare_classes": rare_names, "table": table,
                                           "details": details})
    with atomic_file(report_dir / "suite.md") as handle:
        handle.write(render_markdown(table, config.masking_rates, epochs))
    with atomic_file(report_dir / "suite.html") as handle:
        handle.write(render_html(table, config.masking_rates, epochs))
    with atomic_file(report_dir / "summary.md") as handle:
        handle.write(render_summary(table, rare_names, epochs))
    _log_to_mlflow(params, table, report_dir)
    return SuiteResult(report_dir=str(report_dir), variants=list(config.suite), table=table)


def _fmt(value: float, ci: list[float] | None = None) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and all(map(math.isfinite, ci)) else "")


def _columns(rates: list[float]) -> list[str]:
    return [f"{r:.1f}" for r in rates if r > 0]


def render_markdown(table: list[dict], rates: list[float], epochs: int) -> str:
    columns = _columns(rates)
    header = "| model | AUC (95 % CI) | F1 | accuracy | " + " | ".join(f"AUC @ {c}" for c in columns) + " |"
    lines = [
        f"# Ablations and baselines\n\nSame data, same budget ({epochs} epochs, same early stopping), same "
        "harness. AUC-ROC is macro one-vs-rest on the test split; '@ r' is random masking of a fraction r of "
        "the modality slots (at least one kept per patient).\n",
        header,
        "|" + "---|" * (4 + len(columns)),
    ]
    for row in table:
        cells = [_fmt(row.get(f"auc@{c}", float("nan"))) for c in columns]
        lines.append(f"| {row['variant']} | {_fmt(row['auc'], row['auc_ci'])} | {row['f1']:.3f} | "
                     f"{row['accuracy']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_html(table: list[dict], rates: list[float], epochs: int) -> str:
    columns = _columns(rates)
    head = "".join(f"<th>{h}</th>" for h in ["model", "AUC (95 % CI)", "F1", "accuracy",
                                               *(f"AUC @ {c}" for c in columns)])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in [
            row["variant"], _fmt(row["auc"], row["auc_ci"]), f"{row['f1']:.3f}", f"{row['accuracy']:.3f}",
            *(_fmt(row.get(f"auc@{c}", float("nan"))) for c in columns)]) + "</tr>"
        for row in table
    )
    return (
        "<!doctype html><html><head><meta charset=utf-8><title>meddiff ablations and baselines</title>"
        "<style>body{font-family:sans-serif}td,th{padding:2px 10px;text-align:left}</style></head><body>"
        f"<h1>Ablations and baselines</h1><p>Same data, same budget ({epochs} epochs), same harness.</p>"
        f"<table><tr>{head}</tr>{body}</table></body></html>\n"
    )


def render_summary(table: list[dict], rare_names: list[str], epochs: int) -> str:
    rows = {r["variant"]: r for r in table}
    lines = ["# Headline results\n", f"All models: same data, same budget ({epochs} epochs), test split, 95 % "
             "bootstrap intervals (patients resampled). These are the numbers as measured; nothing is tuned "
             "to make them look better.\n"]
    unimodal = [rows[v] for v in UNIMODAL if v in rows]
    if "full" in rows and unimodal:
        best = max(unimodal, key=lambda r: r["auc"])
        verdict = "higher" if rows["full"]["auc_ci"][0] > best["auc_ci"][1] else (
            "higher, but the intervals overlap" if rows["full"]["auc"] > best["auc"] else "not higher")
        lines.append("## Fused vs best unimodal, no masking\n")
        lines.append(f"- fused (full model): AUC {_fmt(rows['full']['auc'], rows['full']['auc_ci'])}")
        lines.append(f"- best unimodal ({best['variant']}): AUC {_fmt(best['auc'], best['auc_ci'])}")
        lines.append(f"- the fused model is {verdict}.\n")
    if "image_only" in rows and "feature_lr" in rows:
        image, baseline = rows["image_only"], rows["feature_lr"]
        lines.append("## Image path vs a logistic regression on hand-made image features\n")
        lines.append(f"- image_only: AUC {_fmt(image['auc'], image['auc_ci'])}")
        lines.append(f"- feature_lr: AUC {_fmt(baseline['auc'], baseline['auc_ci'])}")
        lines.append(f"- the image model is {'not ' if image['auc'] < baseline['auc'] else ''}at or above the "
                     "feature baseline.\n")
    reference = rows.get("no_imputation") or rows.get("full")
    if reference and "no_masking" in rows:
        lines.append("## Masking-trained vs no-masking ablation under missing modalities\n")
        lines.append(f"Both without diffusion imputation ('{reference['variant']}' vs 'no_masking'); rare "
                     f"subset = {', '.join(rare_names) or 'none'} (one-vs-rest AUC, mean over masks).\n")
        lines.append(
            "| masking | masking-trained AUC | no-masking AUC | masking-trained rare AUC | no-masking rare AUC |"
        )
        lines.append("|---|---|---|---|---|")
        for rate in ("0.6", "0.8"):
            a, b = reference, rows["no_masking"]
            if f"auc@{rate}" in a:
                lines.append(
                    f"| {rate} | {_fmt(a[f'auc@{rate}'], a[f'auc_ci@{rate}'])} | "
                    f"{_fmt(b[f'auc@{rate}'], b[f'auc_ci@{rate}'])} | {_fmt(a[f'rare_auc@{rate}'])} | "
                    f"{_fmt(b[f'rare_auc@{rate}'])} |"
                )
        if "full" in rows and "no_imputation" in rows:
            lines.append("\nWith diffusion imputation of the missing latents (full model): " + ", ".join(
                f"AUC @ {rate} {_fmt(rows['full'].get(f'auc@{rate}', float('nan')))}" for rate in ("0.6", "0.8")))
        lines.append("")
    return "\n".join(lines) + "\n"


def _log_to_mlflow(params: Params, table: list[dict], report_dir: Path) -> None:
    import mlflow

    from meddiff import tracking

    experiment_id = tracking.setup_experiment(params.tracking)
    with mlflow.start_run(experiment_id=experiment_id, run_name="suite", tags=tracking.run_tags(params, None)):
        for row in table:
            mlflow.log_metrics({
                f"{row['variant']}.{k.replace('@', '_at_')}": v
                for k, v in row.items() if isinstance(v, float) and math.isfinite(v)
            })
        for name in ("suite.md", "suite.html", "summary.md", "suite.json"):
            mlflow.log_artifact(str(report_dir / name), artifact_path="suite")
