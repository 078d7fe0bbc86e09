"""The model card of one registered model version (``model_card.md``), filled from the run's own outputs.

Sections: intended use, model and provenance, data (data version, processed-data MD5, counts per class and
site and split, modality availability), metrics with 95 % bootstrap intervals (test split, per class, rare
classes), the site subgroup, robustness under missing modalities, explanation scores, known limits derived
from those numbers, the registry decision, and the reporting items of TRIPOD+AI (Collins et al., BMJ 2024;
385:e078378) and CLAIM (Mongan et al., Radiol Artif Intell 2020; item numbers of that version) that a model
card can answer, each with the section that answers it. Nothing is written per run by hand: every number comes
from the stage outputs (``reports/evaluate/metrics.json``, ``robustness.csv``, ``reports/explain/metrics.json``,
the preprocess data card or the processed data, ``models/run.json``, the gate decision). A source that is
missing makes its section, and the checklist rows it answers, say ``not measured``.

Written by the ``promote`` stage (:mod:`meddiff.evaluation.promote`) to ``reports/promote/model_card.md`` and
logged with the registered model version.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from meddiff import MODALITIES
from meddiff.data.dataset import SPLITS, ProcessedDataset
from meddiff.io import atomic_file, read_json

CARD_FILE = "model_card.md"
NOT_MEASURED = "not measured"
#: Fewer test patients with a condition than this: its interval is too wide to rely on (stated as a limit).
FEW_TEST_POSITIVES = 10
#: Robustness scenarios that mask modalities at random (``robustness.csv`` ``scenario``).
RANDOM_SCENARIO = "random"
#: Explanation scores shown per method (``reports/explain/metrics.json`` ``localisation.<method>.all``).
LOCALISATION_SUBSET = "all"
DECIMALS = 3
#: The encoder of each modality (meddiff.model, docs/model.md).
ENCODERS = {"image": "3-D CNN", "text": "transformer (BERT architecture)", "tabular": "feature-token transformer"}

# Section titles; the checklist table refers to them.
INTENDED_USE = "Intended use"
MODEL = "Model and provenance"
DATA = "Data"
METRICS = "Metrics (test split)"
SUBGROUPS = "Subgroup: acquisition site"
ROBUSTNESS = "Robustness to missing modalities"
EXPLANATIONS = "Explanations"
LIMITS = "Known limits"
REGISTRY = "Registry decision"
#: An item no pipeline output answers (e.g. validation on external data): always ``not measured``.
NOWHERE = ""

#: (checklist, item, topic, section that answers it). Only items a model card of this pipeline can answer;
#: study-level items (ethics, funding, protocol, registration, patient involvement) belong to the study report.
REPORTING_ITEMS: tuple[tuple[str, str, str, str], ...] = (
    ("TRIPOD+AI", "3b", "target population, place in the care pathway, intended users", INTENDED_USE),
    ("TRIPOD+AI", "5a", "sources of data", DATA),
    ("TRIPOD+AI", "6a", "setting: number and location of centres", DATA),
    ("TRIPOD+AI", "8a", "outcome (the diagnoses predicted)", INTENDED_USE),
    ("TRIPOD+AI", "9a", "predictors (input modalities)", MODEL),
    ("TRIPOD+AI", "11", "missing data", ROBUSTNESS),
    ("TRIPOD+AI", "12a", "how the data were used (development, validation, test)", DATA),
    ("TRIPOD+AI", "12c", "model type, training, internal validation", MODEL),
    ("TRIPOD+AI", "12d", "heterogeneity across centres", SUBGROUPS),
    ("TRIPOD+AI", "12e", "performance measures", METRICS),
    ("TRIPOD+AI", "13", "class imbalance", DATA),
    ("TRIPOD+AI", "14", "fairness", SUBGROUPS),
    ("TRIPOD+AI", "15", "model output (calibrated probabilities)", METRICS),
    ("TRIPOD+AI", "18f", "code availability (commit)", MODEL),
    ("TRIPOD+AI", "21", "participants and outcome events per analysis", DATA),
    ("TRIPOD+AI", "23a", "performance with confidence intervals", METRICS),
    ("TRIPOD+AI", "23b", "performance in key subgroups", SUBGROUPS),
    ("TRIPOD+AI", "26", "limitations", LIMITS),
    ("CLAIM", "7", "data sources", DATA),
    ("CLAIM", "13", "handling of missing data", ROBUSTNESS),
    ("CLAIM", "20", "assignment of data to partitions", DATA),
    ("CLAIM", "21", "level at which partitions are disjoint (patient)", DATA),
    ("CLAIM", "22", "model description", MODEL),
    ("CLAIM", "25", "training approach", MODEL),
    ("CLAIM", "26", "selection of the final model", REGISTRY),
    ("CLAIM", "28", "performance metrics", METRICS),
    ("CLAIM", "29", "uncertainty (confidence intervals)", METRICS),
    ("CLAIM", "30", "robustness or sensitivity analysis", ROBUSTNESS),
    ("CLAIM", "31", "explainability", EXPLANATIONS),
    ("CLAIM", "32", "validation on external data", NOWHERE),
    ("CLAIM", "34", "characteristics of cases in each partition", DATA),
    ("CLAIM", "36", "diagnostic accuracy and its precision", METRICS),
    ("CLAIM", "38", "limitations", LIMITS),
    ("CLAIM", "39", "intended use and clinical role", INTENDED_USE),
)


@dataclass(frozen=True)
class CardInputs:
    """Everything a card is filled from; ``None`` marks an output this run did not produce.

    Attributes:
        model_name: the registered model's name.
        model_version: its version, ``None`` when the model was not registered.
        classes: class names in model output order.
        modalities: the modalities the model was trained to use (``train.modalities``).
        data_summary: counts in the format of the preprocess data card (``n_patients``, ``per_class``,
            ``per_site``, ``per_split``, ``class_by_split``, ``site_by_split``, ``modality_availability``).
        data_summary_source: where ``data_summary`` was read from (a path or ``processed data``).
        data_version: the version of the data the model was trained on (``meddiff.data_version``).
        data_md5: MD5 of the processed arrays (the training run's ``meddiff.data_md5``).
        training: ``models/run.json`` of the training stage.
        metrics: ``reports/evaluate/metrics.json``.
        robustness: the rows of ``reports/evaluate/robustness.csv``.
        explanation: ``reports/explain/metrics.json``.
        decision: the registry gate's decision (:class:`meddiff.evaluation.promote.GateDecision` as a dict).
        provenance: tags of the run (``meddiff.git_commit``, ``meddiff.params_hash``).
    """

    model_name: str
    model_version: str | None
    classes: list[str]
    modalities: list[str]
    data_summary: dict[str, Any] | None = None
    data_summary_source: str | None = None
    data_version: str | None = None
    data_md5: str | None = None
    training: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    robustness: list[dict[str, Any]] | None = None
    explanation: dict[str, Any] | None = None
    decision: dict[str, Any] | None = None
    provenance: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# reading the run's outputs


def data_summary(data: ProcessedDataset) -> dict[str, Any]:
    """Counts of the processed data in the format of the preprocess data card (patients per class, site,
    split and their cross-tables, modality availability)."""
    labels = np.asarray(data.arrays["label"])
    sites = np.asarray(data.arrays["site"]).astype(str)
    splits = np.asarray(data.arrays["split"]).astype(str)
    present = np.asarray(data.arrays["modality_present"]).astype(bool)
    names = data.class_names
    site_names = sorted(set(sites.tolist()))
    availability = {m: int(present[:, i].sum()) for i, m in enumerate(MODALITIES)}
    availability["all_three"] = int(present.all(axis=1).sum())
    return {
        "n_patients": len(labels),
        "classes": list(names),
        "per_class": {c: int((labels == k).sum()) for k, c in enumerate(names)},
        "per_site": {s: int((sites == s).sum()) for s in site_names},
        "per_split": {s: int((splits == s).sum()) for s in SPLITS},
        "class_by_split": {s: {c: int(((splits == s) & (labels == k)).sum()) for k, c in enumerate(names)}
                           for s in SPLITS},
        "site_by_split": {s: {site: int(((splits == s) & (sites == site)).sum()) for site in site_names}
                          for s in SPLITS},
        "modality_availability": availability,
    }


def read_robustness(path: Path) -> list[dict[str, Any]] | None:
    """The rows of ``robustness.csv`` with numbers parsed (``True``/``False`` as booleans); ``None`` if absent."""
    if not Path(path).is_file():
        return None
    with open(path, newline="", encoding="utf-8") as handle:
        return [{key: _parse(value) for key, value in row.items()} for row in csv.DictReader(handle)]


def _parse(value: str | None) -> Any:
    if value is None or value == "":
        return None
    if value in ("True", "False"):
        return value == "True"
    try:
        return float(value)
    except ValueError:
        return value


def read_optional_json(path: Path) -> dict[str, Any] | None:
    return read_json(path) if Path(path).is_file() else None


# --------------------------------------------------------------------------------------------------
# formatting


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def number(value: Any) -> str:
    """``0.851`` for a finite number, the integer itself for counts, else ``not measured``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{value:.{DECIMALS}f}" if _finite(value) else NOT_MEASURED


def estimate(entry: Any) -> str:
    """``0.851 [0.779, 0.931]`` for a ``{value, ci_low, ci_high}`` entry, the number for a plain one."""
    if isinstance(entry, Mapping):
        value = entry.get("value")
        if not _finite(value):
            return NOT_MEASURED
        low, high = entry.get("ci_low"), entry.get("ci_high")
        if _finite(low) and _finite(high):
            return f"{number(value)} [{number(low)}, {number(high)}]"
        return number(value)
    return number(entry)


def _table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> list[str]:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def _label(key: str) -> str:
    return key.replace("_", " ")


# --------------------------------------------------------------------------------------------------
# sections: each returns (lines, measured)


def _intended_use(card: CardInputs) -> tuple[list[str], bool]:
    sites = sorted((card.data_summary or {}).get("per_site", {}))
    lines = [
        "Diagnostic decision support: for one patient, calibrated probabilities of each of the classes "
        + ", ".join(f"`{c}`" for c in card.classes)
        + " from whichever of the modalities " + ", ".join(f"`{m}`" for m in card.modalities)
        + " are available (missing modalities are allowed; see the robustness section).",
        "",
        "- Users: clinicians and ML engineers of the site that trained it, as a second reader; every output "
        "needs review by a clinician. Not a medical device and not cleared for autonomous diagnosis.",
        "- In scope: patients like those of the data below"
        + (f" (sites {', '.join(f'`{s}`' for s in sites)})" if sites else "")
        + ", with one of the classes above.",
        "- Out of scope: other conditions, other sites or scanners than those in the data, modalities the model "
        "was not trained with, and any use outside the populations measured here.",
    ]
    return lines, bool(card.classes)


def _model(card: CardInputs) -> tuple[list[str], bool]:
    training = card.training or {}
    rows = [
        ("registered model", f"`{card.model_name}` version {card.model_version}" if card.model_version
         else f"`{card.model_name}`, not registered"),
        ("architecture", "encoders (" + ", ".join(f"{m}: {ENCODERS.get(m, m)}" for m in card.modalities)
         + "), cross-attention fusion, DDPM on the fused latent, classifier head (docs/model.md)"),
        ("input modalities", ", ".join(card.modalities) or NOT_MEASURED),
        ("training run (MLflow)", training.get("mlflow_run_id") or NOT_MEASURED),
        ("model URI", training.get("model_uri") or NOT_MEASURED),
        ("epochs run / best epoch", f"{training['epochs_run']} / {training['best_epoch']}"
         if "epochs_run" in training and "best_epoch" in training else NOT_MEASURED),
        ("model selection", "the epoch with the best validation macro AUC "
         f"({number(training.get('best_val_auc'))})" if training else NOT_MEASURED),
        ("git commit", card.provenance.get("meddiff.git_commit") or NOT_MEASURED),
        ("params hash", card.provenance.get("meddiff.params_hash") or NOT_MEASURED),
    ]
    return _table(["", ""], rows), bool(training)


def _data(card: CardInputs) -> tuple[list[str], bool]:
    summary = card.data_summary
    head = [
        f"- Data version: {card.data_version or NOT_MEASURED}",
        f"- Processed data MD5: {card.data_md5 or NOT_MEASURED}",
    ]
    if not summary:
        return [*head, f"- Counts: {NOT_MEASURED}"], False
    source = card.data_summary_source or "the data card"
    head += [
        f"- Patients: {summary.get('n_patients', NOT_MEASURED)} (counts from {source}); every patient is in exactly "
        "one of the splits (patient-level partition)",
        "",
    ]
    splits = [s for s in SPLITS if s in summary.get("per_split", {})]
    by_class = summary.get("class_by_split", {})
    rows = [[name, *(by_class.get(s, {}).get(name, 0) for s in splits), total]
            for name, total in summary.get("per_class", {}).items()]
    lines = [*head, *_table(["class", *splits, "total"], rows), ""]
    by_site = summary.get("site_by_split", {})
    rows = [[site, *(by_site.get(s, {}).get(site, 0) for s in splits), total]
            for site, total in summary.get("per_site", {}).items()]
    lines += [*_table(["site", *splits, "total"], rows), ""]
    availability = summary.get("modality_availability", {})
    if availability:
        lines.append("Modality availability (patients): "
                     + ", ".join(f"{_label(k)} {v}" for k, v in availability.items()))
    return lines, True


def _metrics(card: CardInputs) -> tuple[list[str], bool]:
    test = (card.metrics or {}).get("test")
    if not test:
        return [f"Test-split metrics: {NOT_MEASURED}."], False
    lines = [f"Test patients: {test.get('n', NOT_MEASURED)}. Point estimate [95 % bootstrap interval, patients "
             "resampled].", ""]
    rows = [(_label(k), estimate(v)) for k, v in test.items() if isinstance(v, Mapping) and "value" in v]
    lines += _table(["metric", "value [95 % CI]"], rows)
    per_class = test.get("auc_per_class", {})
    if per_class:
        lines += ["", *_table(["class", "AUC one-vs-rest [95 % CI]"], [(c, estimate(v)) for c, v in per_class.items()])]
    rare = (card.metrics or {}).get("rare") or {}
    if rare:
        rows = [(name, entry.get("n_positive", NOT_MEASURED), estimate(entry.get("auc")),
                 estimate(entry.get("sensitivity"))) for name, entry in rare.items()]
        lines += ["", "Rare classes:", "", *_table(["class", "test positives", "AUC [95 % CI]",
                                                     "sensitivity [95 % CI]"], rows)]
    return lines, True


def _subgroups(card: CardInputs) -> tuple[list[str], bool]:
    report = (card.metrics or {}).get("subgroup")
    if not report:
        return [f"Site subgroup: {NOT_MEASURED}."], False
    if report.get("applicable") is False:
        return [f"Not applicable: {report.get('reason', 'no reason recorded')} "
                f"(unknown site: {report.get('n_unknown_site', 0)} test patients)."], False
    site = report.get("site")
    inside, rest = report.get("subgroup", {}), report.get("rest", {})
    rows = [
        (f"site `{site}`", report.get("n_subgroup", NOT_MEASURED), estimate(inside.get("auc_macro")),
         number(inside.get("f1_macro"))),
        ("other sites", report.get("n_rest", NOT_MEASURED), estimate(rest.get("auc_macro")),
         number(rest.get("f1_macro"))),
    ]
    lines = _table(["group", "test patients", "macro AUC [95 % CI]", "macro F1"], rows)
    lines += ["", f"- AUC gap (other sites − `{site}`): {estimate(report.get('auc_gap'))}",
              f"- Equalised-odds difference: {number(report.get('equalised_odds_difference'))}"]
    return lines, True


def _robustness(card: CardInputs) -> tuple[list[str], bool]:
    rows = card.robustness
    if not rows:
        return [f"Robustness sweep: {NOT_MEASURED}."], False
    table = []
    for row in rows:
        auc = {"value": row.get("auc_macro"), "ci_low": row.get("auc_ci_low"), "ci_high": row.get("auc_ci_high")}
        note = row.get("reason") or row.get("note") or ""
        table.append((row.get("scenario", ""), "yes" if row.get("imputation") else "no",
                      number(row.get("masking_rate")), number(row.get("masked_fraction")), estimate(auc),
                      number(row.get("rare_auc")), _count(row.get("n_patients")), note))
    header = ["scenario", "imputation", "masking rate", "masked fraction", "macro AUC [95 % CI]", "rare-class AUC",
              "patients", "note"]
    return ["Modalities hidden from the model on the test split (random masking of modality slots at each rate; "
            "`absent_<m>`: modality m removed; `subset_<…>`: only those shown).", "", *_table(header, table)], True


def _count(value: Any) -> str:
    return str(int(value)) if _finite(value) else NOT_MEASURED


def _explanations(card: CardInputs) -> tuple[list[str], bool]:
    summary = card.explanation
    if summary and summary.get("applicable") is False:
        return [f"Explanation scores: not applicable ({summary.get('reason', '')})."], False
    if not summary or not summary.get("localisation"):
        return [f"Explanation scores: {NOT_MEASURED} (no explain report for this model when the card was "
                "written)."], False
    localisation = summary["localisation"]
    scores = list(dict.fromkeys(s for entry in localisation.values() for s in entry.get(LOCALISATION_SUBSET, {})))
    rows = [[method, *(estimate(entry.get(LOCALISATION_SUBSET, {}).get(s)) for s in scores)]
            for method, entry in localisation.items()]
    lines = [f"Attributions scored against the lesion masks of {summary.get('n_patients', NOT_MEASURED)} test "
             "patients (localisation, [95 % CI]):", "", *_table(["method", *map(_label, scores)], rows)]
    faithfulness = summary.get("faithfulness") or {}
    if faithfulness:
        rows = [(method, number(entry.get("modality_agreement", {}).get("spearman_pooled")),
                 number(entry.get("modality_agreement", {}).get("top_agreement")))
                for method, entry in faithfulness.items()]
        lines += ["", "Faithfulness: agreement of each method's modality shares with the drop in probability when "
                  "that modality is removed:", "", *_table(["method", "Spearman (pooled)", "top-modality agreement"],
                                                          rows)]
    drops = summary.get("mean_modality_drop") or {}
    if drops:
        lines += ["", "Mean drop in the predicted class's probability when a modality is removed: "
                  + ", ".join(f"{m} {number(v)}" for m, v in drops.items())]
    return lines, True


def _limits(card: CardInputs) -> list[str]:
    """Limits stated from the numbers of this run."""
    limits = ["Internal validation only: every metric is measured on a held-out split of the same data; no "
              "external data set was evaluated (CLAIM 32)."]
    summary = card.data_summary or {}
    test = (card.metrics or {}).get("test") or {}
    auc = test.get("auc_macro") or {}
    if _finite(auc.get("ci_low")) and _finite(auc.get("ci_high")):
        limits.append(f"Test split of {test.get('n', NOT_MEASURED)} patients: the macro-AUC interval is "
                      f"{auc['ci_high'] - auc['ci_low']:.{DECIMALS}f} wide.")
    for name, entry in ((card.metrics or {}).get("rare") or {}).items():
        positives = entry.get("n_positive")
        if isinstance(positives, int) and positives < FEW_TEST_POSITIVES:
            limits.append(f"Rare class `{name}`: {positives} test patients with it; its sensitivity "
                          f"{estimate(entry.get('sensitivity'))} rests on too few to rely on.")
    subgroup = (card.metrics or {}).get("subgroup") or {}
    if subgroup.get("applicable") is False:
        limits.append(f"No comparison between sites: {subgroup.get('reason', 'not applicable')}.")
    elif subgroup.get("auc_gap"):
        gap = subgroup["auc_gap"]
        if _finite(gap.get("ci_low")) and _finite(gap.get("ci_high")) and (gap["ci_low"] > 0 or gap["ci_high"] < 0):
            limits.append(f"Performance differs by site: AUC gap (other sites − `{subgroup.get('site')}`) "
                          f"{estimate(gap)} excludes 0.")
    limits += _robustness_limits(card.robustness or [])
    ece = test.get("ece")
    if isinstance(ece, Mapping) and _finite(ece.get("value")):
        limits.append(f"Calibration: expected calibration error {estimate(ece)} on the test split.")
    availability = summary.get("modality_availability", {})
    absent = [m for m in card.modalities if availability.get(m) == 0]
    if absent:
        limits.append(f"Modalities absent from the data: {', '.join(absent)}; the model never saw them.")
    sites = sorted(summary.get("per_site", {}))
    if sites:
        limits.append(f"Sites in the data: {', '.join(sites)}; other sites are unmeasured.")
    if not card.explanation:
        limits.append(f"Explanations: {NOT_MEASURED} for this version.")
    return [f"- {limit}" for limit in limits]


def _robustness_limits(rows: list[dict[str, Any]]) -> list[str]:
    plain = [r for r in rows if not r.get("imputation") and _finite(r.get("auc_macro"))]
    random = sorted((r for r in plain if r.get("scenario") == RANDOM_SCENARIO and _finite(r.get("masking_rate"))),
                    key=lambda r: r["masking_rate"])
    limits = []
    if len(random) > 1 and random[-1]["auc_macro"] < random[0]["auc_macro"]:
        limits.append(f"Missing modalities cost accuracy: macro AUC {number(random[0]['auc_macro'])} with all "
                      f"available, {number(random[-1]['auc_macro'])} with {number(random[-1]['masking_rate'])} of "
                      "modality slots masked.")
    absent = [r for r in plain if str(r.get("scenario", "")).startswith("absent_")]
    if absent:
        worst = min(absent, key=lambda r: r["auc_macro"])
        limits.append(f"Worst single missing modality: `{worst['scenario']}`, macro AUC {number(worst['auc_macro'])}.")
    return limits


def _registry(card: CardInputs) -> tuple[list[str], bool]:
    decision = card.decision
    if not decision:
        return [f"Registry gate: {NOT_MEASURED}."], False
    lines = [
        f"- Candidate: version {decision.get('candidate_version') or 'none'}, test macro AUC "
        f"{number(decision.get('candidate_auc'))}",
        f"- Champion before: version {decision.get('champion_version_before') or 'none'}, macro AUC "
        f"{number(decision.get('champion_auc'))}"
        + (f" ({decision['champion_auc_source']})" if decision.get("champion_auc_source") else ""),
        f"- Promoted to `champion`: {'yes' if decision.get('promoted') else 'no'} ({decision.get('reason', '')})",
    ]
    return lines, True


def render_model_card(card: CardInputs) -> str:
    """The Markdown model card of ``card`` (see the module docstring for the sections)."""
    version = f" version {card.model_version}" if card.model_version else ""
    sections: list[tuple[str, tuple[list[str], bool]]] = [
        (INTENDED_USE, _intended_use(card)),
        (MODEL, _model(card)),
        (DATA, _data(card)),
        (METRICS, _metrics(card)),
        (SUBGROUPS, _subgroups(card)),
        (ROBUSTNESS, _robustness(card)),
        (EXPLANATIONS, _explanations(card)),
        (LIMITS, (_limits(card), True)),
        (REGISTRY, _registry(card)),
    ]
    measured = {title: ok for title, (_, ok) in sections}
    lines = [f"# Model card: `{card.model_name}`{version}", "",
             "Filled by `meddiff promote` from this run's own outputs (evaluate, explain, preprocess, train, the "
             f"registry gate); `{NOT_MEASURED}` marks what this run did not produce.", ""]
    for title, (body, _) in sections:
        lines += [f"## {title}", "", *body, ""]
    rows = [(checklist, item, topic, _where(section, measured)) for checklist, item, topic, section in REPORTING_ITEMS]
    lines += ["## Reporting items (TRIPOD+AI, CLAIM)", "",
              "Items a model card can answer; study-level items (ethics approval, funding, protocol, registration, "
              "patient involvement) belong to the study report.", "",
              *_table(["checklist", "item", "topic", "answered in"], rows), ""]
    return "\n".join(lines)


def _where(section: str, measured: Mapping[str, bool]) -> str:
    if section == NOWHERE:
        return NOT_MEASURED
    return f"§ {section}" if measured.get(section) else f"{NOT_MEASURED} (§ {section})"


def write_model_card(report_dir: Path, card: CardInputs) -> Path:
    """Render ``card`` and write it to ``report_dir/model_card.md`` atomically."""
    target = Path(report_dir) / CARD_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(target) as handle:
        handle.write(render_model_card(card))
    return target
