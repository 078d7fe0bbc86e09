"""The model card: every number of the run appears where it belongs, a missing output says ``not measured``,
and ``promote`` writes the card and logs it with the registered version."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from meddiff.evaluation import model_card
from meddiff.evaluation.model_card import NOT_MEASURED, CardInputs, render_model_card
from meddiff.evaluation.promote import MODEL_CARD_TAG, run_promote
from meddiff.io import write_json

CLASSES = ["healthy", "stroke", "abscess"]
DATA_CARD = {
    "n_patients": 120,
    "classes": CLASSES,
    "per_class": {"healthy": 70, "stroke": 41, "abscess": 9},
    "per_site": {"site_a": 101, "site_b": 19},
    "per_split": {"train": 80, "val": 16, "test": 24},
    "class_by_split": {"train": {"healthy": 47, "stroke": 27, "abscess": 6},
                       "val": {"healthy": 9, "stroke": 6, "abscess": 1},
                       "test": {"healthy": 14, "stroke": 8, "abscess": 2}},
    "site_by_split": {"train": {"site_a": 67, "site_b": 13}, "val": {"site_a": 14, "site_b": 2},
                      "test": {"site_a": 20, "site_b": 4}},
    "modality_availability": {"image": 117, "text": 0, "tabular": 110, "all_three": 0},
}
METRICS = {
    "class_names": CLASSES,
    "test": {
        "auc_macro": {"value": 0.8513, "ci_low": 0.7791, "ci_high": 0.9307, "n_valid": 500},
        "f1_macro": {"value": 0.6343, "ci_low": 0.4473, "ci_high": 0.7853, "n_valid": 500},
        "ece": {"value": 0.0805, "ci_low": 0.0602, "ci_high": 0.1844, "n_valid": 500},
        "auc_per_class": {"healthy": {"value": 0.9261, "ci_low": 0.8602, "ci_high": 0.9782},
                          "stroke": {"value": 0.8182, "ci_low": 0.7077, "ci_high": 0.9096},
                          "abscess": {"value": 0.7706, "ci_low": 0.5065, "ci_high": 1.0}},
        "n": 24,
    },
    "rare": {"abscess": {"n_positive": 2, "auc": {"value": 0.7706, "ci_low": 0.5065, "ci_high": 1.0},
                         "sensitivity": {"value": 0.5, "ci_low": 0.0, "ci_high": 1.0}}},
    "subgroup": {
        "applicable": True, "site": "site_b", "n_subgroup": 4, "n_rest": 20, "n_unknown_site": 0,
        "subgroup": {"auc_macro": {"value": 0.9702, "ci_low": 0.8690, "ci_high": 1.0}, "f1_macro": 0.5952},
        "rest": {"auc_macro": {"value": 0.8457, "ci_low": 0.7667, "ci_high": 0.9366}, "f1_macro": 0.6142},
        "auc_gap": {"value": -0.1246, "ci_low": -0.2260, "ci_high": -0.0049},
        "equalised_odds_difference": 0.5625,
    },
}
ROBUSTNESS_HEADER = ["model", "scenario", "imputation", "masking_rate", "masked_fraction", "auc_macro", "auc_ci_low",
                     "auc_ci_high", "f1_macro", "accuracy", "rare_auc", "n_patients"]
ROBUSTNESS = [
    ["meddiff", "random", "False", "0.0", "0.0", "0.8513", "0.7791", "0.9307", "0.63", "0.71", "0.77", "24"],
    ["meddiff", "random", "False", "0.8", "0.6552", "0.7193", "0.6010", "0.8200", "0.50", "0.60", "0.55", "24"],
    ["meddiff", "absent_image", "False", "0.3276", "0.3276", "0.6021", "0.4800", "0.7100", "0.40", "0.50", "", "24"],
    ["meddiff", "absent_tabular", "True", "0.3448", "0.3448", "0.8100", "0.7000", "0.9000", "0.60", "0.70", "", "24"],
]
EXPLANATION = {
    "n_patients": 12,
    "localisation": {
        "grad_attention": {"all": {"pointing": {"value": 0.05, "ci_low": 0.0, "ci_high": 0.125},
                                   "dice_fraction": {"value": 0.0086, "ci_low": 0.0013, "ci_high": 0.0192}}},
        "occlusion": {"all": {"pointing": {"value": 0.4167, "ci_low": 0.1667, "ci_high": 0.6667},
                              "dice_fraction": {"value": 0.2133, "ci_low": 0.1010, "ci_high": 0.3301}}},
    },
    "faithfulness": {"occlusion": {"modality_agreement": {"spearman_pooled": 0.7311, "top_agreement": 0.9}}},
    "mean_modality_drop": {"image": 0.1216, "tabular": 0.0402},
}
DECISION = {"model": "meddiff-diagnosis", "candidate_version": "3", "candidate_auc": 0.8513,
            "champion_version_before": "2", "champion_auc": 0.8021,
            "champion_auc_source": "rescored on this test split", "promoted": True,
            "reason": "candidate AUC 0.8513 > champion AUC 0.8021"}


def write_robustness(path: Path, rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(ROBUSTNESS_HEADER)
        writer.writerows(rows)
    return path


def full_card(tmp_path: Path) -> CardInputs:
    return CardInputs(
        model_name="meddiff-diagnosis", model_version="3", classes=CLASSES, modalities=["image", "text", "tabular"],
        data_summary=DATA_CARD, data_summary_source="reports/preprocess/data_card.json",
        data_version="sha256:4be1c0ffee", data_md5="0cc175b9c0f1b6a831c399e269772661",
        training={"mlflow_run_id": "abc123", "model_uri": "models:/m-42", "epochs_run": 15, "best_epoch": 6,
                  "best_val_auc": 0.8903},
        metrics=METRICS, robustness=model_card.read_robustness(write_robustness(tmp_path / "r.csv", ROBUSTNESS)),
        explanation=EXPLANATION, decision=DECISION,
        provenance={"meddiff.git_commit": "968af97", "meddiff.params_hash": "p-hash-1"},
    )


def section(card: str, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", card, re.MULTILINE | re.DOTALL)
    assert match, f"no section {title!r}"
    return match.group(1)


def table_rows(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith("|") and not line.startswith("|---")]


def test_every_number_lands_in_its_section(tmp_path: Path) -> None:
    card = render_model_card(full_card(tmp_path))
    assert card.startswith("# Model card: `meddiff-diagnosis` version 3\n")

    data = section(card, model_card.DATA)
    assert "- Data version: sha256:4be1c0ffee" in data and "0cc175b9c0f1b6a831c399e269772661" in data
    assert "Patients: 120" in data
    rows = table_rows(data)
    assert ["class", "train", "val", "test", "total"] in rows
    assert ["healthy", "47", "9", "14", "70"] in rows and ["abscess", "6", "1", "2", "9"] in rows
    assert ["site_b", "13", "2", "4", "19"] in rows
    assert "image 117, text 0, tabular 110, all three 0" in data

    metrics = section(card, model_card.METRICS)
    assert ["auc macro", "0.851 [0.779, 0.931]"] in table_rows(metrics)
    assert ["ece", "0.081 [0.060, 0.184]"] in table_rows(metrics)
    assert ["stroke", "0.818 [0.708, 0.910]"] in table_rows(metrics)
    assert ["abscess", "2", "0.771 [0.506, 1.000]", "0.500 [0.000, 1.000]"] in table_rows(metrics)
    assert "Test patients: 24" in metrics

    subgroup = section(card, model_card.SUBGROUPS)
    assert ["site `site_b`", "4", "0.970 [0.869, 1.000]", "0.595"] in table_rows(subgroup)
    assert ["other sites", "20", "0.846 [0.767, 0.937]", "0.614"] in table_rows(subgroup)
    assert "AUC gap (other sites − `site_b`): -0.125 [-0.226, -0.005]" in subgroup
    assert "Equalised-odds difference: 0.562" in subgroup  # 0.5625 is exact in binary: rounds half to even

    robustness = table_rows(section(card, model_card.ROBUSTNESS))
    assert ["random", "no", "0.800", "0.655", "0.719 [0.601, 0.820]", "0.550", "24", ""] in robustness
    assert ["absent_image", "no", "0.328", "0.328", "0.602 [0.480, 0.710]", NOT_MEASURED, "24", ""] in robustness

    explanations = section(card, model_card.EXPLANATIONS)
    assert ["method", "pointing", "dice fraction"] in table_rows(explanations)
    assert ["occlusion", "0.417 [0.167, 0.667]", "0.213 [0.101, 0.330]"] in table_rows(explanations)
    assert ["occlusion", "0.731", "0.900"] in table_rows(explanations)
    assert "image 0.122, tabular 0.040" in explanations

    model = table_rows(section(card, model_card.MODEL))
    assert ["training run (MLflow)", "abc123"] in model and ["git commit", "968af97"] in model
    assert ["epochs run / best epoch", "15 / 6"] in model

    registry = section(card, model_card.REGISTRY)
    assert "version 2, macro AUC 0.802 (rescored on this test split)" in registry
    assert "Promoted to `champion`: yes (candidate AUC 0.8513 > champion AUC 0.8021)" in registry

    limits = section(card, model_card.LIMITS)
    assert "macro-AUC interval is 0.152 wide" in limits  # 0.9307 - 0.7791
    assert "Rare class `abscess`: 2 test patients" in limits
    assert "AUC gap (other sites − `site_b`) -0.125 [-0.226, -0.005] excludes 0" in limits
    assert "macro AUC 0.851 with all available, 0.719 with 0.800 of modality slots masked" in limits
    assert "Worst single missing modality: `absent_image`, macro AUC 0.602" in limits
    assert "Modalities absent from the data: text" in limits
    assert "Explanations" not in limits

    items = table_rows(section(card, "Reporting items (TRIPOD+AI, CLAIM)"))
    by_item = {(row[0], row[1]): row[3] for row in items[1:]}
    assert by_item[("TRIPOD+AI", "23a")] == f"§ {model_card.METRICS}"
    assert by_item[("TRIPOD+AI", "14")] == f"§ {model_card.SUBGROUPS}"
    assert by_item[("CLAIM", "31")] == f"§ {model_card.EXPLANATIONS}"
    assert by_item[("CLAIM", "32")] == NOT_MEASURED  # no external validation in this pipeline
    assert len(by_item) == len(model_card.REPORTING_ITEMS)


def test_missing_outputs_say_not_measured() -> None:
    card = render_model_card(CardInputs(model_name="meddiff-diagnosis", model_version=None, classes=CLASSES,
                                        modalities=["image", "tabular"]))
    assert card.startswith("# Model card: `meddiff-diagnosis`\n")
    assert f"Test-split metrics: {NOT_MEASURED}." in section(card, model_card.METRICS)
    assert f"Site subgroup: {NOT_MEASURED}." in section(card, model_card.SUBGROUPS)
    assert f"Robustness sweep: {NOT_MEASURED}." in section(card, model_card.ROBUSTNESS)
    assert f"Explanation scores: {NOT_MEASURED}" in section(card, model_card.EXPLANATIONS)
    data = section(card, model_card.DATA)
    assert f"- Data version: {NOT_MEASURED}" in data and f"- Counts: {NOT_MEASURED}" in data
    assert ["registered model", "`meddiff-diagnosis`, not registered"] in table_rows(section(card, model_card.MODEL))
    assert f"Explanations: {NOT_MEASURED} for this version." in section(card, model_card.LIMITS)
    items = {(row[0], row[1]): row[3] for row in table_rows(section(card, "Reporting items (TRIPOD+AI, CLAIM)"))[1:]}
    assert items[("TRIPOD+AI", "23a")] == f"{NOT_MEASURED} (§ {model_card.METRICS})"
    assert items[("CLAIM", "30")] == f"{NOT_MEASURED} (§ {model_card.ROBUSTNESS})"
    assert items[("TRIPOD+AI", "3b")] == f"§ {model_card.INTENDED_USE}"  # the classes are known


def test_single_site_and_unmeasurable_rows(tmp_path: Path) -> None:
    metrics = {**METRICS, "subgroup": {"applicable": False, "reason": "fewer than two known sites in the data",
                                       "site": None, "n_subgroup": 0, "n_rest": 0, "n_unknown_site": 3}}
    rows = [["meddiff", "random", "False", "0.2", "0.0", "nan", "nan", "nan", "nan", "nan", "nan", "0"]]
    card = render_model_card(CardInputs(
        model_name="m", model_version="1", classes=CLASSES, modalities=["tabular"], metrics=metrics,
        robustness=model_card.read_robustness(write_robustness(tmp_path / "r.csv", rows)),
    ))
    assert "Not applicable: fewer than two known sites in the data (unknown site: 3 test patients)." in card
    assert "No comparison between sites: fewer than two known sites in the data." in section(card, model_card.LIMITS)
    assert ["random", "no", "0.200", "0.000", NOT_MEASURED, NOT_MEASURED, "0", ""] in table_rows(
        section(card, model_card.ROBUSTNESS))


def test_data_summary_counts_the_processed_data(tiny_processed) -> None:
    _, data = tiny_processed
    summary = model_card.data_summary(data)
    labels, splits = data.arrays["label"], data.arrays["split"]
    assert summary["n_patients"] == len(labels)
    assert list(summary["per_class"].values()) == np.bincount(labels, minlength=data.n_classes).tolist()
    for split, counts in summary["class_by_split"].items():
        assert sum(counts.values()) == int((splits == split).sum()) == summary["per_split"][split]
    assert sum(summary["per_site"].values()) == len(labels)
    present = data.arrays["modality_present"]
    assert summary["modality_availability"]["all_three"] == int(present.all(axis=1).sum())
    # the same format the preprocess data card has: the card renders it the same way
    card = render_model_card(CardInputs("m", None, data.class_names, ["image"], data_summary=summary))
    assert f"Patients: {len(labels)}" in card


def test_promote_writes_and_logs_the_card(trained_tiny, tmp_path: Path) -> None:
    from mlflow.artifacts import download_artifacts
    from mlflow.tracking import MlflowClient

    params = trained_tiny["params"]
    reports = tmp_path / "reports"
    evaluation = reports / "evaluate"
    write_json(evaluation / "metrics.json", {**METRICS, "class_names": trained_tiny["data"].class_names})
    write_robustness(evaluation / "robustness.csv", ROBUSTNESS)
    write_json(reports / "explain" / "metrics.json", EXPLANATION)
    run_promote(params, trained_tiny["processed"], trained_tiny["models"], evaluation, reports / "explain",
                reports / "preprocess", reports / "promote")

    card = (reports / "promote" / model_card.CARD_FILE).read_text()
    version = json.loads((trained_tiny["models"] / "run.json").read_text())["registered_version"]
    assert card.startswith(f"# Model card: `{params.tracking.registered_model}` version {version}\n")
    assert ["auc macro", "0.851 [0.779, 0.931]"] in table_rows(section(card, model_card.METRICS))
    assert ["occlusion", "0.417 [0.167, 0.667]", "0.213 [0.101, 0.330]"] in table_rows(
        section(card, model_card.EXPLANATIONS))
    summary = model_card.data_summary(trained_tiny["data"])  # no data card beside it: counted from the data
    assert f"Patients: {summary['n_patients']} (counts from the processed data)" in card
    run_id = json.loads((trained_tiny["models"] / "run.json").read_text())["mlflow_run_id"]
    client = MlflowClient(tracking_uri=params.tracking.tracking_uri)
    recorded: dict[str, Any] = client.get_run(run_id).data.tags
    assert f"- Processed data MD5: {recorded['meddiff.data_md5']}" in card
    assert ["git commit", recorded["meddiff.git_commit"]] in table_rows(section(card, model_card.MODEL))

    location = client.get_model_version(params.tracking.registered_model, version).tags[MODEL_CARD_TAG]
    logged = Path(download_artifacts(location, dst_path=str(tmp_path / "downloaded")))
    assert logged.read_text() == card


def test_disabled_promote_still_writes_the_card_without_logging(trained_tiny, tmp_path: Path) -> None:
    from meddiff.config import apply_overrides

    params = apply_overrides(trained_tiny["params"], ["promote.enabled=false"])
    evaluation = tmp_path / "evaluate"
    write_json(evaluation / "metrics.json", METRICS)
    run_promote(params, trained_tiny["processed"], trained_tiny["models"], evaluation, tmp_path / "explain",
                tmp_path / "preprocess", tmp_path / "promote")
    card = (tmp_path / "promote" / model_card.CARD_FILE).read_text()
    assert "Promoted to `champion`: no (promote.enabled is false)" in card
    assert f"Explanation scores: {NOT_MEASURED}" in card

