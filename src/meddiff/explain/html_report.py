"""The explanation report as one self-contained HTML page (no network: figures are inline, the review
form is plain HTML and JavaScript and saves its answers as a JSON download).

Layout: a summary (the method comparison: localisation with 95 % intervals, per class, visible lesions,
healthy patients, faithfulness), then one section per patient (three planes, note highlights, EHR
relevance bars, calibrated probability) each with its Likert items (proposal §3.6, clinician evaluation
via Likert scales).
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from typing import Any

#: Likert items asked for every patient (1 strongly disagree … 5 strongly agree).
LIKERT_ITEMS: dict[str, str] = {
    "image_region": "The highlighted image region is where I see the finding.",
    "note_words": "The highlighted words of the note are the ones that support this diagnosis.",
    "ehr_features": "The EHR features marked relevant are clinically plausible for this diagnosis.",
    "trust": "This explanation helps me decide whether to trust the model's diagnosis.",
}
LIKERT_SCALE = ("strongly disagree", "disagree", "neutral", "agree", "strongly agree")
#: Localisation columns of the comparison tables: score key, header.
SCORE_COLUMNS = (
    ("pointing", "pointing game"), ("dice_topk", "Dice top-k"), ("iou_topk", "IoU top-k"),
    ("dice_otsu", "Dice Otsu"), ("iou_otsu", "IoU Otsu"), ("dice_fraction", "Dice ≥ f·max"),
    ("iou_fraction", "IoU ≥ f·max"),
)
#: Width of the EHR bar chart (px) and of its label column.
BAR_WIDTH, LABEL_WIDTH, BAR_HEIGHT = 220, 150, 16

STYLE = """
body{font-family:system-ui,sans-serif;max-width:72em;margin:auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.2em}
td,th{padding:.15em .6em;text-align:right;border-bottom:1px solid #ddd}
th:first-child,td:first-child{text-align:left}caption{text-align:left;font-weight:bold;padding:.3em 0}
section.patient{border-top:2px solid #888;margin-top:2em}.note{line-height:1.9}.ci{color:#777;font-size:85%}
.shown{background:#fff6d8}fieldset{border:1px solid #ccc;margin:.6em 0}legend{font-weight:bold}
.likert label{margin-right:.8em;white-space:nowrap}.item{margin:.35em 0}.planes img{width:32%;margin-right:1%}
#save{position:sticky;bottom:0;background:#fff;padding:.6em 0;border-top:1px solid #ccc}
"""

SAVE_SCRIPT = """
function saveReview(){
  const form=document.getElementById('review');
  const answers=[];
  form.querySelectorAll('fieldset[data-patient]').forEach(function(set){
    const entry={patient_id:set.dataset.patient,method:set.dataset.method,scores:{},comment:''};
    set.querySelectorAll('input[type=radio]:checked').forEach(function(r){entry.scores[r.dataset.item]=r.value==='na'?null:Number(r.value);});
    const note=set.querySelector('textarea');entry.comment=note?note.value:'';
    answers.push(entry);
  });
  const payload={report:form.dataset.report,reviewer:document.getElementById('reviewer').value,
    role:document.getElementById('role').value,saved_at:new Date().toISOString(),
    scale:SCALE,items:ITEMS,answers:answers};
  const blob=new Blob([JSON.stringify(payload,null,1)],{type:'application/json'});
  const link=document.createElement('a');
  link.href=URL.createObjectURL(blob);
  link.download='meddiff-review-'+(payload.reviewer||'anonymous').replace(/[^A-Za-z0-9_-]/g,'_')+'.json';
  document.body.appendChild(link);link.click();link.remove();
  return false;
}
"""


def _e(value: object) -> str:
    return html.escape(str(value))


def _interval(ci: Mapping[str, Any] | None, digits: int = 2) -> str:
    if not ci or ci.get("n", 1) == 0 or ci.get("value") is None or ci["value"] != ci["value"]:
        return "–"
    low, high = ci.get("ci_low"), ci.get("ci_high")
    band = f' <span class=ci>[{low:.{digits}f}, {high:.{digits}f}]</span>' if low == low and high == high else ""
    return f"{ci['value']:.{digits}f}{band}"


def score_table(caption: str, rows: Mapping[str, Mapping[str, Any]], shown: str) -> str:
    """A table of localisation scores: one row per map (``rows[name][score]`` = mean with interval)."""
    head = "".join(f"<th>{_e(title)}</th>" for _, title in SCORE_COLUMNS)
    body = []
    for name, scores in rows.items():
        n = next((s.get("n") for s in scores.values() if isinstance(s, Mapping)), 0)
        cells = "".join(f"<td>{_interval(scores.get(key))}</td>" for key, _ in SCORE_COLUMNS)
        body.append(f"<tr{' class=shown' if name == shown else ''}><td>{_e(name)}</td><td>{n}</td>{cells}</tr>")
    return f"<table><caption>{_e(caption)}</caption><tr><th>map</th><th>n</th>{head}</tr>{''.join(body)}</table>"


def _class_table(localisation: Mapping[str, Any], shown: str) -> str:
    classes = sorted({c for entry in localisation.values() for c in entry["by_class"]})
    head = "".join(f"<th colspan=2>{_e(c)}</th>" for c in classes)
    sub = "".join("<th>pointing</th><th>Dice top-k</th>" for _ in classes)
    rows = []
    for name, entry in localisation.items():
        cells = "".join(
            f"<td>{_interval(entry['by_class'].get(c, {}).get('pointing'))}</td>"
            f"<td>{_interval(entry['by_class'].get(c, {}).get('dice_topk'))}</td>" for c in classes
        )
        rows.append(f"<tr{' class=shown' if name == shown else ''}><td>{_e(name)}</td>{cells}</tr>")
    return (f"<table><caption>Per class (lesion patients)</caption><tr><th></th>{head}</tr>"
            f"<tr><th>map</th>{sub}</tr>{''.join(rows)}</table>")


def _healthy_table(healthy: Mapping[str, Any]) -> str:
    if not healthy:
        return "<p>No healthy test patient was explained.</p>"
    rows = "".join(
        f"<tr><td>{_e(name)}</td><td>{entry['n']}</td><td>{_interval(entry['peak_ratio'])}</td>"
        f"<td>{_interval(entry['spread'], 3)}</td><td>{_interval(entry['probability'])}</td>"
        f"<td>{_e(', '.join(f'{k} {v}' for k, v in entry['predicted'].items()))}</td></tr>"
        for name, entry in healthy.items()
    )
    return ("<table><caption>Healthy patients: what the map shows with nothing to find</caption><tr><th>method</th>"
            "<th>n</th><th>peak / median lesion-patient peak</th><th>spread (share of brain ≥ f·max)</th>"
            f"<th>p(predicted)</th><th>predicted</th></tr>{rows}</table>")


def _faithfulness_table(faithfulness: Mapping[str, Any], modalities: Sequence[str]) -> str:
    head = "".join(f"<th>share {m}</th>" for m in modalities)
    deletion_head = "".join(f"<th>deletion {m}: map / random</th>" for m in modalities)
    rows = []
    for name, entry in faithfulness.items():
        agreement = entry["modality_agreement"]
        shares = "".join(f"<td>{entry['mean_share'][m]:.2f}</td>" for m in modalities)
        deletion = "".join(
            f"<td>{_interval(entry['deletion'].get(m, {}).get('auc'))} / "
            f"{_interval(entry['deletion'].get(m, {}).get('auc_random'))}</td>" for m in modalities
        )
        rows.append(
            f"<tr><td>{_e(name)}</td><td>{agreement['spearman_pooled']:.2f}</td>"
            f"<td>{agreement['spearman_per_patient']:.2f}</td><td>{agreement['top_agreement']:.2f}</td>"
            f"{shares}{deletion}</tr>"
        )
    return ("<table><caption>Faithfulness: modality shares against deleting the modality (Spearman), and "
            "deletion-curve areas (lower falls faster; 95 % intervals)</caption><tr><th>method</th>"
            f"<th>ρ pooled</th><th>ρ per patient</th><th>top modality agrees</th>{head}{deletion_head}</tr>"
            f"{''.join(rows)}</table>")


def ehr_bars(features: Sequence[tuple[str, float]]) -> str:
    """Inline SVG bar chart of EHR feature relevance (scaled to the largest)."""
    if not features:
        return "<p><em>no EHR</em></p>"
    largest = max((value for _, value in features), default=0.0) or 1.0
    bars = []
    for row, (name, value) in enumerate(features):
        y = row * (BAR_HEIGHT + 4)
        width = BAR_WIDTH * value / largest
        bars.append(
            f'<text x="{LABEL_WIDTH - 6}" y="{y + BAR_HEIGHT - 4}" text-anchor="end" font-size="12">{_e(name)}</text>'
            f'<rect x="{LABEL_WIDTH}" y="{y}" width="{width:.1f}" height="{BAR_HEIGHT}" fill="#e07b00"/>'
            f'<text x="{LABEL_WIDTH + width + 4:.1f}" y="{y + BAR_HEIGHT - 4}" font-size="11">{value:.3g}</text>'
        )
    height = len(features) * (BAR_HEIGHT + 4)
    return (f'<svg role="img" aria-label="EHR feature relevance" width="{LABEL_WIDTH + BAR_WIDTH + 60}" '
            f'height="{height}">{"".join(bars)}</svg>')


def highlight_tokens(tokens: Sequence[str], weights: Sequence[float]) -> str:
    """The note's tokens, each on a background as strong as its relevance (scaled to the largest)."""
    largest = max(weights, default=0.0) or 1.0
    return " ".join(
        f'<span title="{weight:.3g}" style="background:rgba(255,120,0,{weight / largest:.2f})">{_e(token)}</span>'
        for token, weight in zip(tokens, weights, strict=True)
    )


def _likert(patient_id: str, method: str) -> str:
    items = []
    for key, statement in LIKERT_ITEMS.items():
        name = f"{patient_id}__{key}"
        choices = "".join(
            f'<label><input type=radio name="{_e(name)}" data-item="{key}" value="{score}"> {score} {_e(label)}</label>'
            for score, label in enumerate(LIKERT_SCALE, start=1)
        )
        choices += f'<label><input type=radio name="{_e(name)}" data-item="{key}" value="na"> n/a</label>'
        items.append(f'<div class=item>{_e(statement)}<div class=likert>{choices}</div></div>')
    return (f'<fieldset data-patient="{_e(patient_id)}" data-method="{_e(method)}"><legend>Your review of '
            f"{_e(patient_id)}</legend>{''.join(items)}<div class=item>Comment<br>"
            f'<textarea name="{_e(patient_id)}__comment" rows=2 cols=80></textarea></div></fieldset>')


def _patient_section(patient: Mapping[str, Any], method: str, modalities: Sequence[str]) -> str:
    scores = patient.get("scores")
    localised = (
        f"peak in the lesion: <b>{'yes' if scores['pointing'] else 'no'}</b>; Dice top-k {scores['dice_topk']:.2f}, "
        f"Otsu {scores['dice_otsu']:.2f}, ≥ f·max {scores['dice_fraction']:.2f}" if scores else "no lesion mask"
    )
    shares = ", ".join(f"{m} {patient['modality_share'][m]:.2f}" for m in modalities)
    drops = ", ".join(
        f"{m} {patient['modality_drop'][m]:+.2f}" for m in modalities if patient["modality_drop"][m] is not None
    )
    figure = "".join(
        f'<img src="{uri}" alt="{_e(plane)} slice of {_e(patient["patient_id"])}">'
        for plane, uri in patient.get("planes", {}).items()
    ) or "<p><em>no image</em></p>"
    return (
        f'<section class=patient id="{_e(patient["patient_id"])}"><h2>{_e(patient["patient_id"])}</h2>'
        f"<p>recorded diagnosis <b>{_e(patient['true'])}</b>; model: <b>{_e(patient['predicted'])}</b> with "
        f"calibrated probability <b>{patient['probability']:.2f}</b> (uncalibrated {patient['probability_raw']:.2f}). "
        f"{localised}.</p><div class=planes>{figure}</div><p class=legend>Attribution ({_e(method)}) in colour, "
        "scaled to its maximum; lesion mask outlined in cyan.</p>"
        f"<p>Relevance share per modality ({_e(method)}): {shares}. Drop of the probability when the modality is "
        f"removed: {drops or '–'}.</p>"
        f"<h3>Note</h3><p class=note>{patient['note_html']}</p>"
        f"<h3>EHR feature relevance</h3>{ehr_bars(patient['tabular'])}"
        f"{_likert(str(patient['patient_id']), method)}</section>"
    )


def render_report(summary: Mapping[str, Any], patients: Sequence[Mapping[str, Any]]) -> str:
    """The whole page from the stage's ``summary`` (metrics.json) and the drawn ``patients``."""
    shown, modalities = summary["method"], summary["modalities"]
    localisation = summary["localisation"]
    visible = {name: entry["visible"] for name, entry in localisation.items() if isinstance(entry["visible"], dict)}
    visible_html = (
        score_table(f"Visible lesions (contrast ≥ {summary['visible_contrast_hu']:g} HU)", visible, shown)
        if visible else f"<p>Visible-lesion subset: {_e(summary['visible_subset'])}.</p>"
    )
    index = "".join(f'<li><a href="#{_e(p["patient_id"])}">{_e(p["patient_id"])}</a> ({_e(p["true"])})</li>'
                    for p in patients)
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>meddiff explanations</title>"
        f"<style>{STYLE}</style></head><body><h1>Explanations of the diagnosis model</h1>"
        f"<p>{summary['n_patients']} test patients with a lesion mask and {summary['n_healthy']} healthy test "
        f"patients; every map explains the class the model predicts. Shown below: <b>{_e(shown)}</b>. Probabilities "
        f"are calibrated by temperature scaling fitted on the validation split (T = {summary['temperature']:.2f}). "
        f"Scores are means over patients with 95 % bootstrap intervals ({summary['n_bootstrap']} resamples); "
        f"f = {summary['attribution_threshold']:g}; the pointing game allows {summary['pointing_tolerance_voxels']} "
        "voxel(s) of tolerance; top-k takes as many voxels as the lesion has. <i>random</i> and <i>centre</i> are "
        "the chance level and a map that always points at the centre of the brain.</p>"
        "<h2>Method comparison</h2>"
        + score_table("All lesions", {name: entry["all"] for name, entry in localisation.items()}, shown)
        + visible_html + _class_table(localisation, shown) + _healthy_table(summary["healthy"])
        + _faithfulness_table(summary["faithfulness"], modalities)
        + f"<h2>Patients</h2><ol>{index}</ol>"
        + f'<form id=review data-report="{_e(summary["report_id"])}" onsubmit="return saveReview()">'
        "<h2>Clinician review</h2><p>Rate each statement for each patient (1 strongly disagree … 5 strongly "
        "agree); nothing is sent anywhere: <b>Save answers</b> downloads them as a JSON file.</p>"
        "<label>Reviewer <input id=reviewer name=reviewer></label> "
        "<label>Role <input id=role name=role placeholder=\"e.g. neuroradiologist\"></label>"
        + "".join(_patient_section(p, shown, modalities) for p in patients)
        + '<div id=save><button type=submit>Save answers (JSON)</button></div></form>'
        + f"<script>const ITEMS={json.dumps(LIKERT_ITEMS)};const SCALE={json.dumps(list(LIKERT_SCALE))};"
        f"{SAVE_SCRIPT}</script></body></html>\n"
    )
