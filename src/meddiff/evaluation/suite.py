"""Ablations and baselines (proposal §3.6): same data, same training budget, same harness, N seeds.

Every model below is trained on the same training split for the same number of epochs (params
``evaluate.suite_epochs``, default ``train.epochs``, with the same early stopping, and
``evaluate.suite_refine_epochs`` of latent-diffusion refinement), once per seed
(``evaluate.suite_seeds`` seeds: ``seed``, ``seed`` + 1, …; the data split is the same for all), and
evaluated by the same code as the ``evaluate`` stage: test metrics with bootstrap intervals, the random
masking sweep and all 7 modality subsets. A variant's row is the mean ± sd over its seeds, with each
seed's own 95 % interval.

Ablations of the proposed model ("full"):
  ``no_masking`` (p = 0), ``concat_fusion`` (concatenation instead of cross-attention),
  ``classifier_only`` (no diffusion and no reconstruction loss), ``no_ontology`` (no RadLex prior),
  ``no_imputation`` (the full model, missing latents left to the learned missing-modality token),
  ``knn_imputation`` (the full model, missing latents imputed by their nearest neighbours in latent
  space, :mod:`.knn_imputation`: the simple conditional baseline diffusion imputation must beat).
Baselines:
  ``image_only`` / ``text_only`` / ``tabular_only`` (the same architecture restricted to one
  modality), ``late_fusion`` (average of the unimodal models' probabilities over the modalities a
  patient has), ``diffmic`` (an image-only diffusion classifier, DiffMIC-style), ``feature_lr`` (a
  logistic regression on hand-made image features, :mod:`.feature_baseline`: the bar ``image_only``
  must clear; not trained for epochs, its regularisation chosen on validation).

Every "A beats B" is a paired difference on the same test patients (and the same random masks),
seeds pooled by :func:`meddiff.evaluation.claims.seed_pooled_difference`; the proposal's claims are
decided from those intervals (:mod:`.claims`), the claims of other stages read from their reports.

Writes into the evaluate report folder ``suite.json``, ``suite.md``, ``suite.html``, ``summary.md``
(the headline comparisons) and ``claims.json`` / ``claims.md`` (every claim of the proposal with its
number, interval and verdict), and logs them to MLflow.
"""

from __future__ import annotations

import html
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from meddiff import MODALITIES
from meddiff.config import Params, apply_overrides
from meddiff.data.dataset import ProcessedDataset, load_processed
from meddiff.evaluation import claims, robustness, subgroups
from meddiff.evaluation.evaluate import model_predictor, test_metrics
from meddiff.io import atomic_file, write_json
from meddiff.metrics import auc_macro

if TYPE_CHECKING:
    from meddiff.model.multimodal import MedDiffModel

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
    "knn_imputation": ["full"],
    "late_fusion": ["image_only", "text_only", "tabular_only"],
    "diffmic": [],
    "feature_lr": [],
}
KNOWN = set(TRAINED_VARIANTS) | set(DERIVED_VARIANTS)
UNIMODAL = ("image_only", "text_only", "tabular_only")
#: Ways of standing in for a missing modality's latent, compared subset by subset (summary.md).
IMPUTERS = {"token": "no_imputation", "diffusion": "full", "knn": "knn_imputation"}
#: Masking rates of the imputation comparison (besides the 7 modality subsets).
IMPUTATION_RATES = (0.6, 0.8)


@dataclass
class SuiteResult:
    report_dir: str
    variants: list[str]
    table: list[dict]
    claims: list[dict]


@dataclass(frozen=True)
class Variant:
    """One compared variant: a predictor per seed and whether it imputes missing latents."""

    predictors: list[robustness.Predict]
    imputation: bool


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


def suite_seeds(params: Params) -> list[int]:
    """The training seeds of every suite model: ``seed``, ``seed`` + 1, … (``evaluate.suite_seeds`` of them)."""
    return [params.seed + k for k in range(params.evaluate.suite_seeds)]


def _late_fusion(predictors: dict[str, robustness.Predict]) -> robustness.Predict:
    def predict(data: ProcessedDataset, index: np.ndarray, present: np.ndarray, impute: bool) -> np.ndarray:
        parts, weights = [], []
        for m, name in enumerate(MODALITIES):
            parts.append(predictors[f"{name}_only"](data, index, present, False))
            weights.append(present[:, m].astype(float))
        stacked, w = np.stack(parts), np.stack(weights)[..., None]  # (3, N, K), (3, N, 1)
        return (stacked * w).sum(0) / np.clip(w.sum(0), 1.0, None)

    return predict


def _diffmic_predictor(params: Params, data: ProcessedDataset, epochs: int, seed: int) -> robustness.Predict:
    from meddiff.evaluation.diffmic import predict_proba_diffmic, train_diffmic

    model = train_diffmic(
        data,
        epochs=epochs,
        batch_size=params.train.batch_size,
        learning_rate=params.train.learning_rate,
        d_model=params.train.model.d_model,
        image_channels=list(params.train.model.image_channels),
        num_train_timesteps=params.train.diffusion.num_train_timesteps,
        seed=seed,
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


def _feature_lr_predictor(data: ProcessedDataset, seed: int) -> robustness.Predict:
    from meddiff.evaluation.feature_baseline import fit_feature_baseline

    model = fit_feature_baseline(data, seed)
    LOG.info("suite: feature_lr C=%s, validation macro AUC %.3f", model.c, model.val_auc)

    def predict(data: ProcessedDataset, index: np.ndarray, present: np.ndarray, impute: bool) -> np.ndarray:
        return model.predict_proba(data, index, present)

    return predict


def _memoised(predict: robustness.Predict) -> robustness.Predict:
    """``predict`` remembering its answers: the sweep, the claims, the imputation comparison and late fusion
    ask a model about the same patients under the same masks more than once (a dataset never changes; the
    internal and the external data are told apart by identity)."""
    answers: dict[tuple[int, bytes, bytes, bool], np.ndarray] = {}

    def remembered(data: ProcessedDataset, index: np.ndarray, present: np.ndarray, impute: bool) -> np.ndarray:
        key = (id(data), np.asarray(index).tobytes(), np.asarray(present, dtype=bool).tobytes(), bool(impute))
        if key not in answers:
            answers[key] = predict(data, index, present, impute)
        return answers[key]

    return remembered


def _timed(cost: dict[str, list[float]], variant: str, build: Callable[[], robustness.Predict]) -> robustness.Predict:
    """``build()``, memoised; its CPU seconds (user + system, all threads of this process) are appended to
    ``cost[variant]``."""
    started = time.process_time()
    predictor = build()
    cost.setdefault(variant, []).append(round(time.process_time() - started, 1))
    return _memoised(predictor)


def build_variants(
    params: Params, data: ProcessedDataset, data_md5: str, epochs: int, cost: dict[str, list[float]]
) -> dict[str, Variant]:
    """Train (or resume from ``paths.checkpoints``/suite) every model the requested variants need, once
    per seed, and return every requested variant's per-seed predictors. Predictions are made with the
    evaluation seed ``seed`` for every model (the same imputation noise and masks for all)."""
    from meddiff.evaluation.knn_imputation import LatentNeighbours, knn_imputing_predictor
    from meddiff.training.fit import fit
    from meddiff.training.train import run_key

    config = params.evaluate
    seeds = suite_seeds(params)
    trained: dict[str, list[MedDiffModel]] = {}
    variants: dict[str, Variant] = {}
    for name in _needed(config.suite):
        imputes = []
        for seed in seeds:
            refine = config.suite_refine_epochs
            variant_params = apply_overrides(params, [
                f"train.epochs={epochs}", f"seed={seed}",
                *([f"train.diffusion.refine_epochs={refine}"] if refine is not None else []), *TRAINED_VARIANTS[name],
            ])
            LOG.info("suite: training %s (seed %d) for up to %d epochs", name, seed, epochs)
            checkpoint_dir = Path(params.paths.checkpoints) / "suite" / f"{name}-{run_key(variant_params, data_md5)}"
            started = time.process_time()
            model = fit(variant_params, data, checkpoint_dir).model
            cost.setdefault(name, []).append(round(time.process_time() - started, 1))
            trained.setdefault(name, []).append(model)
            # the suite measures diffusion imputation wherever the model can impute, whatever its default
            imputes.append(variant_params.train.lambda_diff > 0 and len(variant_params.train.modalities) > 1)
        variants[name] = Variant([_memoised(model_predictor(m, params.seed)) for m in trained[name]], all(imputes))
    if "no_imputation" in config.suite:
        variants["no_imputation"] = Variant(variants["full"].predictors, False)
    if "knn_imputation" in config.suite:
        train_index = data.indices("train")
        variants["knn_imputation"] = Variant([
            _timed(cost, "knn_imputation",
                   lambda m=m: knn_imputing_predictor(m, LatentNeighbours.fit(m, data, train_index), params.seed))
            for m in trained["full"]
        ], True)
    if "late_fusion" in config.suite:
        variants["late_fusion"] = Variant([
            _memoised(_late_fusion({u: variants[u].predictors[k] for u in UNIMODAL})) for k in range(len(seeds))
        ], False)
    if "diffmic" in config.suite:
        variants["diffmic"] = Variant([
            _timed(cost, "diffmic", lambda s=s: _diffmic_predictor(params, data, epochs, s)) for s in seeds
        ], False)
    if "feature_lr" in config.suite:
        variants["feature_lr"] = Variant([
            _timed(cost, "feature_lr", lambda s=s: _feature_lr_predictor(data, s)) for s in seeds
        ], False)
    return {name: variants[name] for name in config.suite}


def condition_predictions(
    predictors: list[robustness.Predict], data: ProcessedDataset, index: np.ndarray, scenario: robustness.Scenario,
    impute: bool,
) -> np.ndarray:
    """(S, R, n, K): every seed's probabilities under each of a scenario's R masks, on its n patients."""
    rows = np.ones(len(index), bool) if scenario.rows is None else scenario.rows
    return np.stack([
        np.stack([predict(data, index[rows], mask[rows], impute) for mask in scenario.masks]) for predict in predictors
    ])


def _scenarios(data: ProcessedDataset, index: np.ndarray, params: Params) -> dict[str, robustness.Scenario]:
    """The robustness sweep's scenarios (the same masks as the sweep), by ``random@<rate>`` or name."""
    built = robustness.build_scenarios(
        data.arrays["modality_present"][index], list(params.evaluate.masking_rates), params.evaluate.n_repeats,
        params.seed,
    )
    return {(f"random@{s.rate:.1f}" if s.name == "random" else s.name): s for s in built}


def claim_predictions(
    variants: dict[str, Variant], data: ProcessedDataset, index: np.ndarray, params: Params
) -> dict[str, dict[str, np.ndarray]]:
    """variant → claims condition → (S, R, N, K) test predictions, for :func:`claims.suite_estimates`.

    Without imputation for every variant (the learned missing-modality token, as ``evaluate`` and
    deployment score); the full model also with diffusion imputation at 60 %. Masking rates absent from
    ``evaluate.masking_rates`` leave their claims unmeasured."""
    scenarios = _scenarios(data, index, params)
    conditions = {claims.NO_MASKING: "random@0.0", claims.MASKED_60: "random@0.6", claims.MASKED_80: "random@0.8"}
    probs: dict[str, dict[str, np.ndarray]] = {}
    for name, variant in variants.items():
        if name in ("no_imputation", "knn_imputation"):
            continue  # the full model's own predictions (and another comparison, summary.md)
        probs[name] = {
            condition: condition_predictions(variant.predictors, data, index, scenarios[key], False)
            for condition, key in conditions.items() if key in scenarios
        }
        if name == "full" and variant.imputation and "random@0.6" in scenarios:
            probs[name][claims.MASKED_60_IMPUTED] = condition_predictions(
                variant.predictors, data, index, scenarios["random@0.6"], True
            )
    return probs


def imputation_comparison(
    variants: dict[str, Variant], data: ProcessedDataset, split: str, params: Params
) -> list[dict]:
    """Token alone vs diffusion vs k-NN imputation of the full model, per modality subset and at 60 / 80 %
    masking, on ``split``: mean AUC over seeds and paired differences against the token (empty when the
    suite lacks one of the three)."""
    if not all(v in variants for v in IMPUTERS.values()):
        return []
    index = data.indices(split)
    scenarios = _scenarios(data, index, params)
    keys = [f"random@{r:.1f}" for r in IMPUTATION_RATES if f"random@{r:.1f}" in scenarios]
    keys += [f"subset_{'+'.join(s)}" for s in robustness.modality_subsets()]
    rows = []
    for key in keys:
        scenario = scenarios[key]
        n = len(index) if scenario.rows is None else int(scenario.rows.sum())
        y = data.arrays["label"][index if scenario.rows is None else index[scenario.rows]]
        if n == 0:
            rows.append({"split": split, "scenario": key, "n_patients": 0, "note": "no patient has these modalities"})
            continue
        probs = {
            imputer: condition_predictions(variants[variant].predictors, data, index, scenario, imputer != "token")
            for imputer, variant in IMPUTERS.items()
        }
        row: dict = {"split": split, "scenario": key, "n_patients": n, "note": ""}
        for imputer, p in probs.items():
            row[f"auc_{imputer}"] = claims.seed_mean(y, p, auc_macro)
        for imputer in ("diffusion", "knn"):
            row[f"{imputer}_minus_token"] = claims.seed_pooled_difference(
                y, probs[imputer], probs["token"], auc_macro, params.evaluate.n_bootstrap, params.seed
            )
        rows.append(row)
    return rows


def _seed_summary(values: list[float]) -> tuple[float, float]:
    """Mean and sample sd (0 for one seed) of the finite ``values``; NaN when none is finite."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return float(np.mean(finite)), float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0


def _row(name: str, per_seed: list[dict]) -> dict:
    """The table row of a variant: mean ± sd over seeds of each metric, every seed's test AUC interval."""
    row: dict = {"variant": name, "n_seeds": len(per_seed)}
    auc = [s["test"]["auc_macro"] for s in per_seed]
    row["auc"], row["auc_sd"] = _seed_summary([a["value"] for a in auc])
    row["auc_seed_ci"] = [[a["ci_low"], a["ci_high"]] for a in auc]
    row["f1"], row["f1_sd"] = _seed_summary([s["test"]["f1_macro"]["value"] for s in per_seed])
    row["accuracy"], row["accuracy_sd"] = _seed_summary([s["test"]["accuracy"]["value"] for s in per_seed])
    scenarios = [r["scenario"] for r in per_seed[0]["robustness"]]
    for position, scenario in enumerate(scenarios):
        seed_rows = [s["robustness"][position] for s in per_seed]
        first = seed_rows[0]
        label = f"{first['masking_rate']:.1f}" if scenario == "random" else scenario.removeprefix("subset_")
        if scenario.startswith("absent_"):
            continue
        row[f"auc@{label}"], row[_sd_key(f"auc@{label}")] = _seed_summary([r["auc_macro"] for r in seed_rows])
        row[f"rare_auc@{label}"], _ = _seed_summary([r["rare_auc"] for r in seed_rows])
        if scenario.startswith("subset_"):
            row[f"n@{label}"] = first["n_patients"]
    return row


def external_rare_estimate(
    variants: dict[str, Variant], external_processed_dir: Path, params: Params
) -> claims.Estimate:
    """The rare-subset claim on the external drop admitted by ``meddiff external`` (``<dir>/processed``): the
    full model against the best baseline on the rare class at 80 % masking, every seed, the sweep's masks.
    Missing, with the reason, when the drop has not been admitted or has no rare class."""
    from meddiff.data.admit import PROCESSED_SUBDIR
    from meddiff.evaluation.external import external_rare_classes

    processed = Path(external_processed_dir) / PROCESSED_SUBDIR
    if not (processed / "meta.json").is_file():
        return claims.Estimate.missing(f"not measured on an external drop: {processed} is absent "
                                       "(run `meddiff external_drop` and `meddiff external` first)")
    data = load_processed(processed)
    index = np.arange(len(data))
    y = data.arrays["label"]
    rare = external_rare_classes(params, y, data.class_names)
    scenarios = _scenarios(data, index, params)
    if not rare or "random@0.8" not in scenarios:
        return claims.Estimate.missing("not measured on the external drop: no rare class or no 80 % masking rate")
    probs = {
        name: {claims.MASKED_80: condition_predictions(variant.predictors, data, index, scenarios["random@0.8"],
                                                       False)}
        for name, variant in variants.items() if name == "full" or name in claims.BASELINES
    }
    estimate = claims.suite_estimates(y, probs, rare[0], params.evaluate.n_bootstrap, params.seed)[
        "rare_gain_at_high_missingness"]
    n_rare = int((y == rare[0]).sum())
    return claims.Estimate(estimate.value, estimate.ci_low, estimate.ci_high, estimate.n,
                           f"external drop ({len(y)} patients, {n_rare} {data.class_names[rare[0]]}); {estimate.note}")


def run_suite(params: Params, processed_dir: Path, external_processed_dir: Path, report_dir: Path) -> SuiteResult:
    """The suite on ``processed_dir``; the rare-subset claim on the external drop admitted into
    ``external_processed_dir`` by ``meddiff external`` when it exists (else on the internal test split, saying so)."""
    from meddiff.training.train import data_digest

    config = params.evaluate
    epochs = config.suite_epochs or params.train.epochs
    seeds = suite_seeds(params)
    data = load_processed(processed_dir)
    index = data.indices("test")
    rare = subgroups.rare_classes(data, config.rare_classes)
    y = data.arrays["label"][index]
    cost: dict[str, list[float]] = {}
    variants = build_variants(params, data, data_digest(processed_dir), epochs, cost)

    started = time.process_time()
    table, details = [], {}
    full_mask = data.arrays["modality_present"][index]
    for name, variant in variants.items():
        per_seed = []
        for seed, predict in zip(seeds, variant.predictors, strict=True):
            probs = predict(data, index, full_mask, variant.imputation)
            rows = robustness.robustness_sweep(
                predict, data, index, list(config.masking_rates), config.n_repeats, [variant.imputation], rare,
                config.n_bootstrap, params.seed, model_name=name,
            )
            per_seed.append({"seed": seed, "test": test_metrics(y, probs, data.class_names, config.n_bootstrap,
                                                               params.seed), "robustness": rows})
        table.append(_row(name, per_seed))
        details[name] = {"imputation": variant.imputation, "seeds": per_seed}
    predictions = claim_predictions(variants, data, index, params)
    estimates = claims.suite_estimates(y, predictions, rare[0] if rare else None, config.n_bootstrap, params.seed)
    external_rare = external_rare_estimate(variants, external_processed_dir, params)
    if math.isfinite(external_rare.value):
        estimates["rare_gain_at_high_missingness"] = external_rare
    else:
        internal = estimates["rare_gain_at_high_missingness"]
        estimates["rare_gain_at_high_missingness"] = claims.Estimate(
            internal.value, internal.ci_low, internal.ci_high, internal.n,
            f"internal test split; {external_rare.note}; {internal.note}")
    comparison_rows = claims.claims_table(
        {IMAGE_VS_FEATURES.key: _image_vs_features(y, predictions, config.n_bootstrap, params.seed)},
        (IMAGE_VS_FEATURES,),
    )
    imputation = [*imputation_comparison(variants, data, "val", params),
                  *imputation_comparison(variants, data, "test", params)]
    estimates["diffusion_imputation_helps"] = _with_validation(estimates["diffusion_imputation_helps"], imputation)
    estimates.update(claims.stage_estimates(Path(params.paths.reports), config.n_bootstrap, params.seed))
    claim_rows = claims.claims_table(estimates)
    cost["evaluation"] = [round(time.process_time() - started, 1)]

    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    rare_names = [data.class_names[c] for c in rare]
    settings = {"epochs": epochs, "seeds": seeds, "n_bootstrap": config.n_bootstrap, "n_test": len(index),
                "rare_classes": rare_names}
    write_json(report_dir / "suite.json", {**settings, "table": table, "imputation": imputation,
                                           "cpu_seconds": cost, "details": details})
    claims_json = claims.to_json(claim_rows)
    write_json(report_dir / "claims.json", {**settings, "variants": list(config.suite), "claims": claims_json})
    context = (f"Suite: {len(seeds)} seed(s) per variant ({', '.join(map(str, seeds))}), {epochs} epochs, "
               f"{len(index)} test patients, {config.n_bootstrap} bootstrap resamples. Differences are paired "
               "(same patients, same masks), seeds pooled as in `claims.seed_pooled_difference`.")
    with atomic_file(report_dir / "claims.md") as handle:
        handle.write(claims.render_markdown(claim_rows, context))
    with atomic_file(report_dir / "suite.md") as handle:
        handle.write(render_markdown(table, config.masking_rates, epochs))
    with atomic_file(report_dir / "suite.html") as handle:
        handle.write(render_html(table, config.masking_rates, epochs))
    with atomic_file(report_dir / "summary.md") as handle:
        handle.write(render_summary([*claim_rows, *comparison_rows], imputation, rare_names, epochs, len(seeds)))
    _log_to_mlflow(params, table, claims_json, report_dir)
    return SuiteResult(report_dir=str(report_dir), variants=list(config.suite), table=table, claims=claims_json)


def _with_validation(estimate: claims.Estimate, imputation: list[dict]) -> claims.Estimate:
    """The imputation claim's note, with the validation split's verdict on the default (diffusion vs token)."""
    validation = next((r for r in imputation if r["split"] == "val" and r["scenario"] == "random@0.6"), None)
    if validation is None or not math.isfinite(estimate.value):
        return estimate
    diff = validation["diffusion_minus_token"]
    verdict = ("beats" if diff["ci_low"] > 0 else "does not beat" if diff["ci_high"] <= 0 else
               "is not shown to beat")
    note = (f"{estimate.note}; validation: diffusion − token {_fmt(diff['value'], [diff['ci_low'], diff['ci_high']])}, "
            f"diffusion imputation {verdict} the token alone")
    return claims.Estimate(estimate.value, estimate.ci_low, estimate.ci_high, estimate.n, note)


def _fmt(value: float | None, ci: list[float] | None = None) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and all(map(math.isfinite, ci)) else "")


def _sd_key(metric: str) -> str:
    """Where a row keeps the seeds' sd of ``metric``: ``auc`` → ``auc_sd``, ``auc@0.6`` → ``auc_sd@0.6``."""
    name, at, condition = metric.partition("@")
    return f"{name}_sd{at}{condition}"


def _mean_sd(row: dict, metric: str) -> str:
    value, sd = row.get(metric), row.get(_sd_key(metric))
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.3f} ± {sd:.3f}" if row["n_seeds"] > 1 and sd is not None and math.isfinite(sd) else f"{value:.3f}"


def _seed_intervals(row: dict) -> str:
    return "; ".join(f"[{low:.2f}, {high:.2f}]" for low, high in row["auc_seed_ci"]
                     if math.isfinite(low) and math.isfinite(high))


def _columns(rates: list[float]) -> list[str]:
    return [f"{r:.1f}" for r in rates if r > 0]


def _subset_columns() -> list[str]:
    return ["+".join(s) for s in robustness.modality_subsets()]


def render_markdown(table: list[dict], rates: list[float], epochs: int) -> str:
    columns, subsets = _columns(rates), _subset_columns()
    n_seeds = table[0]["n_seeds"] if table else 0
    lines = [
        f"# Ablations and baselines\n\nSame data, same budget ({epochs} epochs, same early stopping), same "
        f"harness, {n_seeds} seed(s) per model: mean ± sd over seeds, each seed's 95 % bootstrap interval of the "
        "test AUC in brackets. AUC-ROC is macro one-vs-rest on the test split; '@ r' is random masking of a "
        "fraction r of the modality slots (at least one kept per patient).\n",
        "| model | AUC | per-seed 95 % CI | F1 | accuracy | " + " | ".join(f"AUC @ {c}" for c in columns) + " |",
        "|" + "---|" * (5 + len(columns)),
    ]
    for row in table:
        cells = [_mean_sd(row, f"auc@{c}") for c in columns]
        lines.append(f"| {row['variant']} | {_mean_sd(row, 'auc')} | {_seed_intervals(row)} | "
                     f"{_mean_sd(row, 'f1')} | {_mean_sd(row, 'accuracy')} | " + " | ".join(cells) + " |")
    lines += ["", "## Modality subsets\n", "Only the modalities of the subset are shown, to the test patients who "
              "have at least one of them (n in the header). AUC mean ± sd over seeds.\n",
              "| model | " + " | ".join(f"{s} (n={table[0].get(f'n@{s}', 0) if table else 0})" for s in subsets) + " |",
              "|" + "---|" * (1 + len(subsets))]
    for row in table:
        lines.append(f"| {row['variant']} | " + " | ".join(_mean_sd(row, f"auc@{s}") for s in subsets) + " |")
    return "\n".join(lines) + "\n"


def render_html(table: list[dict], rates: list[float], epochs: int) -> str:
    columns, subsets = _columns(rates), _subset_columns()
    head = "".join(f"<th>{h}</th>" for h in ["model", "AUC (mean ± sd)", "per-seed 95 % CI", "F1", "accuracy",
                                               *(f"AUC @ {c}" for c in columns), *subsets])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in [
            row["variant"], _mean_sd(row, "auc"), _seed_intervals(row), _mean_sd(row, "f1"),
            _mean_sd(row, "accuracy"), *(_mean_sd(row, f"auc@{c}") for c in columns),
            *(_mean_sd(row, f"auc@{s}") for s in subsets)]) + "</tr>"
        for row in table
    )
    return (
        "<!doctype html><html><head><meta charset=utf-8><title>meddiff ablations and baselines</title>"
        "<style>body{font-family:sans-serif}td,th{padding:2px 10px;text-align:left}</style></head><body>"
        f"<h1>Ablations and baselines</h1><p>Same data, same budget ({epochs} epochs), same harness; mean ± sd "
        "over seeds. The modality-subset columns show only those modalities.</p>"
        f"<table><tr>{head}</tr>{body}</table></body></html>\n"
    )


#: Not a claim of the proposal but the bar the image path must clear (summary.md, not claims.json).
IMAGE_VS_FEATURES = claims.Claim(
    "image_beats_features", "The image model beats a logistic regression on hand-made image features",
    "§3.6 baselines", "test macro AUC: image_only − feature_lr (paired)", claims.Direction.ABOVE, 0.0,
    "same test patients, paired bootstrap over patients and seeds",
)


def _image_vs_features(
    y: np.ndarray, predictions: dict[str, dict[str, np.ndarray]], n_bootstrap: int, seed: int
) -> claims.Estimate:
    pair = [predictions.get(v, {}).get(claims.NO_MASKING) for v in ("image_only", "feature_lr")]
    if any(p is None for p in pair):
        return claims.Estimate.missing("not measured: the suite has no image_only or no feature_lr")
    interval = claims.seed_pooled_difference(y, *pair, auc_macro, n_bootstrap, seed)
    return claims.Estimate.from_interval(interval, len(y), f"{interval['n_seeds']} seed(s), no masking")


SUITE_CLAIMS = ("fusion_beats_unimodal", "masking_keeps_accuracy_at_80", "rare_gain_at_high_missingness",
                "diffusion_imputation_helps", "ontology_attention_helps", "diffusion_objective_helps",
                IMAGE_VS_FEATURES.key)


def render_summary(
    claim_rows: list[claims.ClaimRow], imputation: list[dict], rare_names: list[str], epochs: int, n_seeds: int
) -> str:
    lines = ["# Headline results\n", f"All models: same data, same budget ({epochs} epochs), {n_seeds} seed(s) each, "
             "test split. Every comparison is a paired difference on the same patients (and the same random "
             "masks) with a 95 % bootstrap interval over patients and seeds; the verdict comes from the interval "
             f"(claims.md). Rare subset: {', '.join(rare_names) or 'none'}. These are the numbers as measured; "
             "nothing is tuned to make them look better.\n",
             "## The suite's comparisons\n", "| comparison | difference [95 % CI] | verdict | how |",
             "|---|---|---|---|"]
    for row in claim_rows:
        if row.key in SUITE_CLAIMS:
            lines.append(f"| {row.quantity} | {_fmt(row.value, [row.ci_low, row.ci_high])} | **{row.verdict.value}** "
                         f"| {row.note} |")
    if imputation:
        lines += ["", "## Standing in for a missing modality: token alone, diffusion, nearest neighbours\n",
                  "Macro AUC (mean over seeds) of the full model when the missing latents are left to the learned "
                  "missing-modality token, inpainted by the latent diffusion model, or imputed from the k nearest "
                  "training patients in latent space; differences paired against the token. Decide the default on "
                  "validation; the test rows confirm.\n",
                  "| split | scenario | n | token | diffusion | k-NN | diffusion − token | k-NN − token |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in imputation:
            if not row["n_patients"]:
                lines.append(f"| {row['split']} | {row['scenario']} | 0 | {row['note']} | | | | |")
                continue
            diffs = [row[f"{m}_minus_token"] for m in ("diffusion", "knn")]
            lines.append(f"| {row['split']} | {row['scenario']} | {row['n_patients']} | {_fmt(row['auc_token'])} | "
                         f"{_fmt(row['auc_diffusion'])} | {_fmt(row['auc_knn'])} | "
                         + " | ".join(_fmt(d["value"], [d["ci_low"], d["ci_high"]]) for d in diffs) + " |")
    return "\n".join(lines) + "\n"


def _log_to_mlflow(params: Params, table: list[dict], claims_json: list[dict], report_dir: Path) -> None:
    import mlflow

    from meddiff import tracking

    experiment_id = tracking.setup_experiment(params.tracking)
    with mlflow.start_run(experiment_id=experiment_id, run_name="suite", tags=tracking.run_tags(params, None)):
        for row in table:
            mlflow.log_metrics({
                f"{row['variant']}.{k.replace('@', '_at_').replace('+', '_')}": v
                for k, v in row.items() if isinstance(v, float) and math.isfinite(v)
            })
        for claim in claims_json:
            mlflow.log_metrics({f"claim.{claim['key']}.{k}": claim[k] for k in ("value", "ci_low", "ci_high")
                                if claim[k] is not None})
            mlflow.set_tag(f"claim.{claim['key']}", claim["verdict"])
        for name in ("suite.md", "suite.html", "summary.md", "suite.json", "claims.json", "claims.md"):
            mlflow.log_artifact(str(report_dir / name), artifact_path="suite")
