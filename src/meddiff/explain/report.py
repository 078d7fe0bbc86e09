"""The ``explain`` stage: attributions of every method for test patients, scored for localisation
(against lesion masks, random and centre priors) and faithfulness (modality deletion, deletion
curves), written as ``metrics.json`` and one self-contained ``index.html`` with a clinician review form,
and logged to MLflow as a child run of the training run.

Patients: the first ``explain.n_patients`` test patients with an image and a non-empty lesion mask,
and the first ``explain.n_healthy`` healthy test patients with an image (reported apart). Only test
patients are explained, so no mask was seen in training.
"""

from __future__ import annotations

import html
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meddiff import MODALITIES
from meddiff.config import ExplainConfig, Params
from meddiff.data.batches import model_inputs, to_batch
from meddiff.data.dataset import ProcessedDataset, load_processed
from meddiff.explain.attribution import Attributions, mask_channels
from meddiff.explain.deletion import patient_curves
from meddiff.explain.faithfulness import modality_deletion, share_agreement
from meddiff.explain.figures import data_uri, plane_pngs
from meddiff.explain.html_report import highlight_tokens, render_report
from meddiff.explain.localisation import centre_map, random_map, score_map, spread, support_mask
from meddiff.explain.methods import EXPLAIN_BATCH, explain_patients
from meddiff.explain.summary import deletion_summary, healthy_summary, localisation_summary, visible_lesions
from meddiff.io import atomic_dir, read_json, write_json
from meddiff.model.calibration import calibrated, fit_temperature, load_temperature
from meddiff.model.multimodal import RUN_FILE, MedDiffModel

LOG = logging.getLogger(__name__)
#: The class whose patients have nothing to find.
HEALTHY = "healthy"
#: The reference maps scored beside the methods.
PRIORS = ("random", "centre")
REPORT_PAGE = "index.html"


@dataclass
class ExplainResult:
    report: str
    n_patients: int
    n_healthy: int
    method: str
    pointing_game: float
    dice_topk: float
    dice_otsu: float
    modality_rank_correlation: float


def select_patients(data: ProcessedDataset, n: int) -> np.ndarray:
    """Test patients with an image and a non-empty lesion mask (those localisation is defined for)."""
    index = data.indices("test")
    arrays = data.arrays
    masks = arrays["lesion_mask"][index].reshape(len(index), -1).any(axis=1)
    usable = index[arrays["has_lesion_mask"][index] & masks & arrays["modality_present"][index, 0]]
    return usable[:n]


def select_healthy(data: ProcessedDataset, n: int) -> np.ndarray:
    """Healthy test patients with an image (none if the cohort has no ``healthy`` class)."""
    if HEALTHY not in data.class_names or n == 0:
        return np.array([], dtype=int)
    index = data.indices("test")
    healthy = data.arrays["label"][index] == data.class_names.index(HEALTHY)
    return index[healthy & data.arrays["modality_present"][index, 0]][:n]


def _logits(model: MedDiffModel, data: ProcessedDataset, index: np.ndarray) -> np.ndarray:
    parts = [np.zeros((0, data.n_classes))]
    with torch.no_grad():
        for start in range(0, len(index), EXPLAIN_BATCH):
            batch = to_batch(data, index[start : start + EXPLAIN_BATCH])
            parts.append(model(model_inputs(batch), batch["modality_present"]).logits.numpy())
    return np.concatenate(parts)


def _faithfulness(
    model: MedDiffModel, data: ProcessedDataset, index: np.ndarray, by_method: dict[str, Attributions],
    supports: list[np.ndarray], config: ExplainConfig, seed: int,
) -> tuple[dict[str, Any], np.ndarray]:
    """Per method: modality-share agreement and deletion curves; and the modality-deletion drops (n, 3)."""
    predicted = next(iter(by_method.values())).predicted
    drops, curves = [], []
    rng = np.random.default_rng(seed)
    for start in range(0, len(index), EXPLAIN_BATCH):
        rows = np.arange(start, min(start + EXPLAIN_BATCH, len(index)))
        batch = to_batch(data, index[rows])
        inputs, present = model_inputs(batch), batch["modality_present"]
        drops.append(modality_deletion(model, inputs, present, predicted[rows]))
        for local, row in enumerate(rows):
            relevance = {
                method: {"image": a.image[row], "text": a.text[row], "tabular": a.tabular[row]}
                for method, a in by_method.items()
            }
            curves.append(patient_curves(model, inputs, present, local, relevance, int(predicted[row]),
                                         supports[row], config.deletion_fractions, rng))
    drop = np.concatenate(drops)
    summary = {
        method: {
            "modality_agreement": share_agreement(attributions.modality_share, drop),
            "mean_share": dict(zip(MODALITIES, map(float, attributions.modality_share.mean(axis=0)), strict=True)),
            "deletion": deletion_summary(curves, method, MODALITIES, config.n_bootstrap, seed),
        }
        for method, attributions in by_method.items()
    }
    return summary, drop


def _localisation(
    data: ProcessedDataset, index: np.ndarray, maps: dict[str, np.ndarray], supports: list[np.ndarray],
    config: ExplainConfig,
) -> dict[str, list[dict[str, float]]]:
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in maps}
    for position, patient in enumerate(index):
        lesion = data.arrays["lesion_mask"][patient].reshape(maps[next(iter(maps))].shape[1:]).astype(bool)
        for name, volume in maps.items():
            rows[name].append(score_map(volume[position], lesion, supports[position],
                                        config.attribution_threshold, config.pointing_tolerance_voxels))
    return rows


def not_applicable(report_dir: Path, reason: str) -> ExplainResult:
    """The report of a model the explanations do not apply to: ``metrics.json`` ``{"applicable": false,
    "reason": …}`` and a page saying why (the stage's outputs exist, so the pipeline and the model card go on)."""
    LOG.warning("explain: not applicable: %s", reason)
    with atomic_dir(report_dir) as staging:
        write_json(staging / "metrics.json", {"applicable": False, "reason": reason})
        (staging / REPORT_PAGE).write_text(f"<!doctype html><title>meddiff explain</title><h1>Explanations not "
                                           f"applicable</h1><p>{html.escape(reason)}</p>\n")
    nan = float("nan")
    return ExplainResult(str(Path(report_dir) / REPORT_PAGE), 0, 0, "", nan, nan, nan, nan)


def run_explain(params: Params, processed_dir: Path, model_dir: Path, report_dir: Path) -> ExplainResult:
    """Explain, score and report (see the module docstring). A model without the image modality (an EHR-only
    dataset) has no lesion to localise: the report says explanations do not apply (:func:`not_applicable`).

    Raises:
        ValueError: no test patient has an image and a lesion mask.
    """
    config = params.explain
    data = load_processed(processed_dir)
    model = MedDiffModel.from_pretrained(model_dir)
    if "image" not in model.spec.modalities:
        return not_applicable(report_dir, f"the model has no image modality (it uses {list(model.spec.modalities)}): "
                                          "the explanations are scored by how well they localise the lesion in the "
                                          "image")
    lesion_index = select_patients(data, config.n_patients)
    if len(lesion_index) == 0:
        raise ValueError(f"{processed_dir}: no test patient has an image and a lesion mask to explain")
    healthy_index = select_healthy(data, config.n_healthy)
    index = np.concatenate([lesion_index, healthy_index])
    n_lesion = len(lesion_index)
    torch.manual_seed(params.seed)
    by_method = {}
    for method in config.methods:
        started = time.perf_counter()
        by_method[method] = explain_patients(model, data, index, method, config)
        LOG.info("%s: %d patients in %.1f s", method, len(index), time.perf_counter() - started)
    brain_channel = next(iter(mask_channels(model, data.arrays["image"].shape[1])), None)
    supports = [support_mask(data.arrays, patient, brain_channel) for patient in index]
    rng = np.random.default_rng(params.seed)
    maps = {method: a.image[:n_lesion] for method, a in by_method.items()}
    maps["random"] = np.stack([random_map(s, rng) for s in supports[:n_lesion]])
    maps["centre"] = np.stack([centre_map(s) for s in supports[:n_lesion]])
    scores = _localisation(data, lesion_index, maps, supports, config)
    true_names = [data.class_names[int(c)] for c in data.arrays["label"][index]]
    visible = visible_lesions(data.arrays, lesion_index, config.visible_contrast_hu)
    localisation = {
        name: localisation_summary(rows, true_names[:n_lesion], visible, config.n_bootstrap, params.seed)
        for name, rows in scores.items()
    }
    predicted_names = [data.class_names[int(c)] for c in next(iter(by_method.values())).predicted]
    healthy = {
        method: healthy_summary(
            a.image[n_lesion:].reshape(len(healthy_index), -1).max(axis=1),
            np.array([spread(a.image[i], supports[i], config.attribution_threshold)
                      for i in range(n_lesion, len(index))]),
            a.probabilities[n_lesion:].max(axis=1) if len(healthy_index) else np.zeros(0),
            predicted_names[n_lesion:],
            a.image[:n_lesion].reshape(n_lesion, -1).max(axis=1),
            config.n_bootstrap, params.seed,
        )
        for method, a in by_method.items()
    } if len(healthy_index) else {}
    faithfulness, drops = _faithfulness(model, data, index, by_method, supports, config, params.seed)
    saved = load_temperature(model_dir)  # the model's own (train fits it); older models: fit it here
    val = data.indices("val")
    temperature = saved if saved is not None else fit_temperature(_logits(model, data, val), data.arrays["label"][val])
    probabilities = calibrated(_logits(model, data, index), temperature)
    shown = by_method[config.method]
    summary: dict[str, Any] = {
        "report_id": f"{Path(model_dir).resolve().name}:{config.method}",
        "method": config.method,
        "methods": list(config.methods),
        "modalities": list(MODALITIES),
        "n_patients": n_lesion,
        "n_healthy": len(healthy_index),
        "attribution_threshold": config.attribution_threshold,
        "pointing_tolerance_voxels": config.pointing_tolerance_voxels,
        "visible_contrast_hu": config.visible_contrast_hu,
        "visible_subset": "available" if visible is not None else localisation[config.method]["visible"],
        "n_visible": int(visible.sum()) if visible is not None else None,
        "n_bootstrap": config.n_bootstrap,
        "temperature": temperature,
        "calibration": "temperature scaling fitted on the validation split (NLL)",
        "localisation": localisation,
        "healthy": healthy,
        "faithfulness": faithfulness,
        "mean_modality_drop": dict(zip(MODALITIES, map(float, np.nanmean(drops, axis=0)), strict=True)),
    }
    records = _patient_records(data, index, shown, scores[config.method], probabilities, drops, true_names)
    drawn = [dict(r) for r in records[: config.n_figures]]
    spacing = data.meta.get("pixdim_mm")
    for position, record in enumerate(drawn):
        patient = index[position]
        lesion = data.arrays["lesion_mask"][patient].reshape(shown.image.shape[1:]).astype(bool)
        planes = plane_pngs(np.asarray(data.arrays["image"][patient, 0], np.float32), shown.image[position],
                            lesion if lesion.any() else None, tuple(spacing) if spacing else None)
        record["planes"] = {name: data_uri(png) for name, png in planes.items()}
        record["note_html"] = _note_html(data, patient, shown.text[position])
    with atomic_dir(report_dir) as staging:
        write_json(staging / "metrics.json", {**summary, "patients": records})
        (staging / REPORT_PAGE).write_text(render_report(summary, drawn))
    _log_to_mlflow(params, model_dir, summary, Path(report_dir))
    headline = localisation[config.method]["all"]
    agreement = faithfulness[config.method]["modality_agreement"]
    LOG.info(
        "explained %d lesion + %d healthy patients (%s): pointing %.2f, Dice top-k %.3f (random %.3f, centre %.3f); "
        "modality shares vs deletion rho %.2f",
        n_lesion, len(healthy_index), config.method, headline["pointing"]["value"], headline["dice_topk"]["value"],
        localisation["random"]["all"]["dice_topk"]["value"], localisation["centre"]["all"]["dice_topk"]["value"],
        agreement["spearman_pooled"],
    )
    return ExplainResult(
        report=str(Path(report_dir) / REPORT_PAGE),
        n_patients=n_lesion,
        n_healthy=len(healthy_index),
        method=config.method,
        pointing_game=headline["pointing"]["value"],
        dice_topk=headline["dice_topk"]["value"],
        dice_otsu=headline["dice_otsu"]["value"],
        modality_rank_correlation=agreement["spearman_pooled"],
    )


def _note_html(data: ProcessedDataset, patient: int, relevance: np.ndarray) -> str:
    if not data.arrays["modality_present"][patient, MODALITIES.index("text")]:
        return "<em>no note</em>"
    ids = data.arrays["token_ids"][patient]
    real = np.asarray(data.arrays["token_mask"][patient], bool) & (ids != 0)
    tokens = [data.vocabulary.get(int(t), f"#{int(t)}") for t in ids[real]]
    return highlight_tokens(tokens, [float(w) for w in relevance[real]])


def _patient_records(
    data: ProcessedDataset, index: np.ndarray, shown: Attributions, scores: list[dict[str, float]],
    probabilities: np.ndarray, drops: np.ndarray, true_names: list[str],
) -> list[dict[str, Any]]:
    features = [f["name"] for f in data.meta.get("tabular_features", [])]
    records = []
    for position, patient in enumerate(index):
        predicted = int(shown.predicted[position])
        present_features = ~np.asarray(data.arrays["tabular_missing"][patient], bool)
        records.append({
            "patient_id": str(data.arrays["patient_id"][patient]),
            "true": true_names[position],
            "predicted": data.class_names[predicted],
            "probability": float(probabilities[position, predicted]),
            "probability_raw": float(shown.probabilities[position, predicted]),
            "scores": scores[position] if position < len(scores) else None,
            "lesion_voxels": int(np.asarray(data.arrays["lesion_mask"][patient]).sum()),
            "modality_share": dict(zip(MODALITIES, map(float, shown.modality_share[position]), strict=True)),
            "modality_drop": {
                m: (None if np.isnan(d) else float(d)) for m, d in zip(MODALITIES, drops[position], strict=True)
            },
            "tabular": [
                (name, float(value))
                for name, value, seen in zip(features, shown.tabular[position], present_features, strict=False) if seen
            ] if data.arrays["modality_present"][patient, MODALITIES.index("tabular")] else [],
        })
    return records


def _log_to_mlflow(params: Params, model_dir: Path, summary: dict[str, Any], report_dir: Path) -> None:
    """Log the scores and the report folder as a child run of the training run that made the model."""
    import mlflow

    from meddiff import tracking

    run_file = Path(model_dir) / RUN_FILE
    parent = read_json(run_file).get("mlflow_run_id") if run_file.is_file() else None
    experiment_id = tracking.setup_experiment(params.tracking)
    tags = tracking.run_tags(params, None)
    if parent:
        tags["mlflow.parentRunId"] = parent
    metrics = {
        f"{name}.{score}": entry["all"][score]["value"]
        for name, entry in summary["localisation"].items() for score in entry["all"]
    }
    for method, entry in summary["faithfulness"].items():
        metrics[f"{method}.modality_spearman"] = entry["modality_agreement"]["spearman_pooled"]
        for modality, curves in entry["deletion"].items():
            metrics[f"{method}.deletion_{modality}.random_minus_map"] = curves["random_minus_map"]["value"]
    with mlflow.start_run(experiment_id=experiment_id, run_name="explain", tags=tags):
        mlflow.log_params({"explain.method": summary["method"], "explain.methods": ",".join(summary["methods"])})
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)})
        mlflow.log_artifacts(str(report_dir), artifact_path="explain")
