"""The ``explain`` stage: attributions for test patients, Dice against lesion masks, an HTML report.

The Dice of each attribution mask is reported next to the Dice of a random mask of the same size
(the chance level for that lesion), so a reader can tell localisation from luck.
"""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meddiff import MODALITIES
from meddiff.config import Params
from meddiff.data.batches import model_inputs, to_batch
from meddiff.data.dataset import ProcessedDataset, load_processed
from meddiff.explain.attribution import Attributions, Method, attribution_mask, dice, explain_batch, pointing_hit
from meddiff.io import atomic_dir, atomic_file, write_json
from meddiff.model.multimodal import MedDiffModel

LOG = logging.getLogger(__name__)


@dataclass
class ExplainResult:
    report: str
    n_patients: int
    mean_dice: float
    mean_dice_random: float
    pointing_game: float


def select_patients(data: ProcessedDataset, n: int) -> np.ndarray:
    """Test patients with an image and a non-empty lesion mask (those Dice is defined for)."""
    index = data.indices("test")
    arrays = data.arrays
    has_lesion = arrays["has_lesion_mask"][index] & (arrays["lesion_mask"][index].reshape(len(index), -1).any(axis=1))
    usable = index[has_lesion & arrays["modality_present"][index, 0]]
    return usable[:n]


def _figure(image: np.ndarray, attribution: np.ndarray, lesion: np.ndarray, title: str, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axial = int(np.argmax(lesion.sum(axis=(0, 1)))) if lesion.any() else image.shape[2] // 2
    figure, axes = plt.subplots(1, 3, figsize=(9, 3.2), dpi=100)
    panels = (
        ("input", image[:, :, axial], None),
        ("attribution", image[:, :, axial], attribution[:, :, axial]),
        ("lesion mask", image[:, :, axial], lesion[:, :, axial]),
    )
    for axis, (name, base, overlay) in zip(axes, panels, strict=True):
        axis.imshow(np.rot90(base), cmap="gray", vmin=0, vmax=1)
        if name == "attribution":
            axis.imshow(np.rot90(overlay), cmap="inferno", alpha=0.5, vmin=0, vmax=1)
        elif overlay is not None:
            axis.imshow(np.ma.masked_equal(np.rot90(overlay.astype(float)), 0.0), cmap="autumn", alpha=0.8)
        axis.set_title(name)
        axis.axis("off")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    with atomic_file(target, "wb") as handle:
        figure.savefig(handle, format="png")
    plt.close(figure)


def _highlight_tokens(ids: np.ndarray, weights: np.ndarray, vocabulary: dict[int, str]) -> str:
    scale = weights.max() if weights.max() > 0 else 1.0
    spans = []
    for token_id, weight in zip(ids, weights, strict=True):
        if token_id == 0:
            continue
        token = html.escape(vocabulary.get(int(token_id), f"#{token_id}"))
        spans.append(f'<span style="background: rgba(255,120,0,{weight / scale:.2f})">{token}</span>')
    return " ".join(spans)


def _explain_all(
    model: MedDiffModel, data: ProcessedDataset, index: np.ndarray, method: Method, batch_size: int = 16
) -> Attributions:
    parts = []
    for start in range(0, len(index), batch_size):
        batch = to_batch(data, index[start : start + batch_size])
        parts.append(explain_batch(model, model_inputs(batch), batch["modality_present"], method))
    return Attributions(*(np.concatenate([getattr(p, f) for p in parts]) for f in Attributions.__dataclass_fields__))


def localisation(attributions: Attributions, data: ProcessedDataset, index: np.ndarray, threshold: float, seed: int):
    """Per patient: Dice of the thresholded map, Dice of a random mask of the same size, pointing hit,
    and the chance of a pointing hit (the dilated lesion's share of the volume)."""
    from scipy.ndimage import binary_dilation

    rng = np.random.default_rng(seed)
    rows = []
    for row, patient in enumerate(index):
        lesion = data.arrays["lesion_mask"][patient, 0].astype(bool)
        predicted_mask = attribution_mask(attributions.image[row], threshold)
        random_mask = rng.permutation(predicted_mask.ravel()).reshape(predicted_mask.shape)
        rows.append({
            "dice": dice(predicted_mask, lesion),
            "dice_random": dice(random_mask, lesion),
            "pointing_hit": pointing_hit(attributions.image[row], lesion),
            "pointing_chance": float(binary_dilation(lesion, iterations=1).mean()),
            "mask_voxels": int(predicted_mask.sum()),
            "lesion_voxels": int(lesion.sum()),
        })
    return rows


def _summary(rows: list[dict]) -> dict[str, float]:
    return {
        "mean_dice": float(np.mean([r["dice"] for r in rows])),
        "mean_dice_random": float(np.mean([r["dice_random"] for r in rows])),
        "pointing_game": float(np.mean([r["pointing_hit"] for r in rows])),
        "pointing_chance": float(np.mean([r["pointing_chance"] for r in rows])),
    }


def run_explain(params: Params, processed_dir: Path, model_dir: Path, report_dir: Path) -> ExplainResult:
    config = params.explain
    data = load_processed(processed_dir)
    model = MedDiffModel.from_pretrained(model_dir)
    index = select_patients(data, config.n_patients)
    if len(index) == 0:
        raise ValueError(f"{processed_dir}: no test patient has an image and a lesion mask to explain")
    by_method = {method: _explain_all(model, data, index, method) for method in ("attention", "grad_attention")}
    localised = {
        method: localisation(attributions, data, index, config.attribution_threshold, params.seed)
        for method, attributions in by_method.items()
    }
    attributions = by_method[config.method]
    features = [f["name"] for f in data.meta.get("tabular_features", [])]
    rows = []
    with atomic_dir(report_dir) as staging:
        (staging / "figures").mkdir()
        for row, patient in enumerate(index):
            lesion = data.arrays["lesion_mask"][patient, 0].astype(bool)
            patient_id = str(data.arrays["patient_id"][patient])
            true_name = data.class_names[int(data.arrays["label"][patient])]
            predicted_name = data.class_names[int(attributions.predicted[row])]
            record = {
                "patient_id": patient_id,
                "true": true_name,
                "predicted": predicted_name,
                "probability": float(attributions.probabilities[row].max()),
                **localised[config.method][row],
                "modality_share": dict(zip(MODALITIES, map(float, attributions.modality_share[row]), strict=True)),
                "figure": f"figures/{patient_id}.png" if row < config.n_figures else None,
            }
            if record["figure"]:
                _figure(
                    data.arrays["image"][patient, 0].astype(np.float32),
                    attributions.image[row],
                    lesion,
                    f"{patient_id}: true {true_name}, predicted {predicted_name} (Dice {record['dice']:.2f})",
                    staging / record["figure"],
                )
            record["note_html"] = _highlight_tokens(
                data.arrays["token_ids"][patient], attributions.text[row], data.vocabulary
            ) if data.arrays["modality_present"][patient, 1] else "<em>no note</em>"
            record["tabular"] = dict(zip(features, map(float, attributions.tabular[row]), strict=False))
            rows.append(record)
        metrics = {
            "n_patients": len(rows),
            "method": config.method,
            **_summary(localised[config.method]),
            "attribution_threshold": config.attribution_threshold,
            "by_method": {method: _summary(values) for method, values in localised.items()},
            "mean_modality_share": {
                m: float(np.mean([r["modality_share"][m] for r in rows])) for m in MODALITIES
            },
            "patients": [{k: v for k, v in r.items() if k != "note_html"} for r in rows],
        }
        write_json(staging / "metrics.json", metrics)
        (staging / "index.html").write_text(_render_html(metrics, rows))
    LOG.info(
        "explained %d patients (%s): mean Dice %.3f (random %.3f), pointing game %.2f (chance %.3f)",
        len(rows), config.method, metrics["mean_dice"], metrics["mean_dice_random"],
        metrics["pointing_game"], metrics["pointing_chance"],
    )
    return ExplainResult(
        report=str(Path(report_dir) / "index.html"),
        n_patients=len(rows),
        mean_dice=metrics["mean_dice"],
        mean_dice_random=metrics["mean_dice_random"],
        pointing_game=metrics["pointing_game"],
    )


def _render_html(metrics: dict, rows: list[dict]) -> str:
    share = ", ".join(f"{m} {v:.2f}" for m, v in metrics["mean_modality_share"].items())
    methods = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{s['mean_dice']:.3f}</td><td>{s['mean_dice_random']:.3f}</td>"
        f"<td>{s['pointing_game']:.2f}</td><td>{s['pointing_chance']:.3f}</td></tr>"
        for name, s in metrics["by_method"].items()
    )
    sections = []
    for r in rows:
        tabular = "".join(
            f"<tr><td>{html.escape(name)}</td><td>{weight:.3f}</td></tr>" for name, weight in r["tabular"].items()
        )
        figure = (
            f"<img src=\"{r['figure']}\" alt=\"attribution for {html.escape(r['patient_id'])}\">" if r["figure"] else ""
        )
        sections.append(
            f"<section><h2>{html.escape(r['patient_id'])}</h2>"
            f"<p>true <b>{html.escape(r['true'])}</b>, predicted <b>{html.escape(r['predicted'])}</b> "
            f"(p = {r['probability']:.2f}); Dice {r['dice']:.3f} (random mask {r['dice_random']:.3f}); "
            f"most relevant voxel in the lesion: {'yes' if r['pointing_hit'] else 'no'}</p>{figure}"
            f"<h3>Note (token relevance, attention rollout)</h3><p class=note>{r['note_html']}</p>"
            f"<h3>EHR features (fusion relevance)</h3><table>{tabular}</table></section>"
        )
    return (
        "<!doctype html><html><head><meta charset=utf-8><title>meddiff explanations</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:auto}section{border-top:1px solid #ccc}"
        "td,th{padding:0 1em;text-align:left}.note{line-height:1.8}</style></head><body>"
        "<h1>Explanations</h1>"
        f"<p>{metrics['n_patients']} test patients with a lesion mask. Attribution mask: voxels with at "
        f"least {metrics['attribution_threshold']:.0%} of the maximum relevance. Shown: "
        f"<b>{html.escape(metrics['method'])}</b>.</p>"
        "<table><tr><th>method</th><th>mean Dice</th><th>random mask</th><th>pointing game</th>"
        f"<th>chance</th></tr>{methods}</table>"
        f"<p>Mean relevance share per modality: {share}.</p>"
        + "".join(sections)
        + "</body></html>\n"
    )
