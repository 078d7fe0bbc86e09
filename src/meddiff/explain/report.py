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
import torch

from meddiff import MODALITIES
from meddiff.config import Params
from meddiff.data.dataset import ProcessedDataset, load_processed
from meddiff.explain.attribution import Attributions, attribution_mask, compute_attributions, dice
from meddiff.io import atomic_dir, atomic_file, write_json
from meddiff.training.batches import MODEL_INPUTS, to_batch
from meddiff.training.checkpoint import load_model

LOG = logging.getLogger(__name__)


@dataclass
class ExplainResult:
    report: str
    n_patients: int
    mean_dice: float
    mean_dice_random: float


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
        if overlay is not None:
            axis.imshow(np.rot90(overlay), cmap="inferno" if name == "attribution" else "Greens", alpha=0.5)
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


def run_explain(params: Params, processed_dir: Path, model_dir: Path, report_dir: Path) -> ExplainResult:
    data = load_processed(processed_dir)
    model = load_model(model_dir)
    index = select_patients(data, params.explain.n_patients)
    if len(index) == 0:
        raise ValueError(f"{processed_dir}: no test patient has an image and a lesion mask to explain")
    batch = to_batch(data, index)
    with torch.no_grad():
        output = model({k: batch[k] for k in MODEL_INPUTS}, batch["present"], output_attentions=True)
    spatial = tuple(int(s) for s in data.arrays["image"].shape[2:])
    attributions: Attributions = compute_attributions(
        output, model.image_encoder.grid, spatial, batch["token_mask"].float()
    )
    probs = torch.softmax(output.logits, dim=-1).numpy()
    rng = np.random.default_rng(params.seed)
    vocabulary = data.vocabulary
    features = [f["name"] for f in data.meta.get("tabular_features", [])]
    rows = []
    with atomic_dir(report_dir) as staging:
        (staging / "figures").mkdir()
        for row, patient in enumerate(index):
            lesion = data.arrays["lesion_mask"][patient, 0].astype(bool)
            predicted_mask = attribution_mask(attributions.image[row], params.explain.attribution_quantile)
            random_mask = rng.permutation(predicted_mask.ravel()).reshape(predicted_mask.shape)
            patient_id = str(data.arrays["patient_id"][patient])
            true_name = data.class_names[int(data.arrays["label"][patient])]
            predicted_name = data.class_names[int(probs[row].argmax())]
            record = {
                "patient_id": patient_id,
                "true": true_name,
                "predicted": predicted_name,
                "probability": float(probs[row].max()),
                "dice": dice(predicted_mask, lesion),
                "dice_random": dice(random_mask, lesion),
                "modality_share": dict(zip(MODALITIES, map(float, attributions.modality_share[row]), strict=True)),
                "figure": f"figures/{patient_id}.png",
            }
            _figure(
                data.arrays["image"][patient, 0].astype(np.float32),
                attributions.image[row],
                lesion,
                f"{patient_id}: true {true_name}, predicted {predicted_name} (Dice {record['dice']:.2f})",
                staging / record["figure"],
            )
            record["note_html"] = _highlight_tokens(
                data.arrays["token_ids"][patient], attributions.text[row], vocabulary
            ) if data.arrays["modality_present"][patient, 1] else "<em>no note</em>"
            record["tabular"] = dict(zip(features, map(float, attributions.tabular[row]), strict=False))
            rows.append(record)
        metrics = {
            "n_patients": len(rows),
            "mean_dice": float(np.mean([r["dice"] for r in rows])),
            "mean_dice_random": float(np.mean([r["dice_random"] for r in rows])),
            "attribution_quantile": params.explain.attribution_quantile,
            "mean_modality_share": {
                m: float(np.mean([r["modality_share"][m] for r in rows])) for m in MODALITIES
            },
            "patients": [{k: v for k, v in r.items() if k != "note_html"} for r in rows],
        }
        write_json(staging / "metrics.json", metrics)
        (staging / "index.html").write_text(_render_html(metrics, rows))
    LOG.info(
        "explained %d patients: mean Dice %.3f (random %.3f)",
        len(rows), metrics["mean_dice"], metrics["mean_dice_random"],
    )
    return ExplainResult(
        report=str(Path(report_dir) / "index.html"),
        n_patients=len(rows),
        mean_dice=metrics["mean_dice"],
        mean_dice_random=metrics["mean_dice_random"],
    )


def _render_html(metrics: dict, rows: list[dict]) -> str:
    share = ", ".join(f"{m} {v:.2f}" for m, v in metrics["mean_modality_share"].items())
    sections = []
    for r in rows:
        tabular = "".join(
            f"<tr><td>{html.escape(name)}</td><td>{weight:.3f}</td></tr>" for name, weight in r["tabular"].items()
        )
        sections.append(
            f"<section><h2>{html.escape(r['patient_id'])}</h2>"
            f"<p>true <b>{html.escape(r['true'])}</b>, predicted <b>{html.escape(r['predicted'])}</b> "
            f"(p = {r['probability']:.2f}); Dice {r['dice']:.3f} (random mask {r['dice_random']:.3f})</p>"
            f"<img src=\"{r['figure']}\" alt=\"attribution for {html.escape(r['patient_id'])}\">"
            f"<h3>Note (token attribution, attention rollout)</h3><p class=note>{r['note_html']}</p>"
            f"<h3>EHR features (fusion attention)</h3><table>{tabular}</table></section>"
        )
    return (
        "<!doctype html><html><head><meta charset=utf-8><title>meddiff explanations</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:auto}section{border-top:1px solid #ccc}"
        "td{padding:0 1em}.note{line-height:1.8}</style></head><body>"
        "<h1>Explanations</h1>"
        f"<p>{metrics['n_patients']} test patients; mean Dice of the attribution mask (top "
        f"{100 * (1 - metrics['attribution_quantile']):.0f} % of voxels) against the lesion mask: "
        f"<b>{metrics['mean_dice']:.3f}</b> (random mask of the same size: {metrics['mean_dice_random']:.3f}).</p>"
        f"<p>Mean attention mass per modality: {share}.</p>"
        + "".join(sections)
        + "</body></html>\n"
    )
