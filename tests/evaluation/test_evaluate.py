import csv
import json
from pathlib import Path

from meddiff.evaluation.evaluate import run_evaluate
from meddiff.intervals import bootstrap_ci
from meddiff.metrics import auc_macro
from meddiff.model.inference import predict_proba
from meddiff.model.multimodal import MedDiffModel


def read_csv(path: Path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_evaluate_writes_metrics_and_sweep(trained_tiny, tmp_path) -> None:
    params = trained_tiny["params"]
    result = run_evaluate(params, trained_tiny["processed"], trained_tiny["models"], tmp_path / "evaluate")
    metrics = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    auc = metrics["test"]["auc_macro"]
    data = trained_tiny["data"]
    index = data.indices("test")
    y = data.arrays["label"][index]
    probs = predict_proba(MedDiffModel.from_pretrained(trained_tiny["models"]), data, index)
    # The saved model on the test split, with the patients-resampled bootstrap interval.
    assert auc == bootstrap_ci(y, probs, auc_macro, params.evaluate.n_bootstrap, params.seed)
    assert auc["value"] == result.test_auc_macro
    unmasked = next(r for r in metrics["robustness"] if r["scenario"] == "random" and r["masking_rate"] == 0.0
                    and not r["imputation"])
    assert unmasked["auc_macro"] == auc["value"]  # rate 0 masks nothing: the same predictions
    present = data.arrays["modality_present"][index]
    absent_image = next(r for r in metrics["robustness"] if r["scenario"] == "absent_image")
    has_other = present[:, 1:].any(axis=1)
    assert absent_image["masked_fraction"] == round(float((present[:, 0] & has_other).sum() / present.sum()), 4)
    assert {"ece", "balanced_accuracy", "auc_per_class"} <= set(metrics["test"])
    subgroup = metrics["subgroup"]
    assert subgroup["n_subgroup"] + subgroup["n_rest"] + subgroup["n_unknown_site"] == result.n_test
    rows = read_csv(tmp_path / "evaluate" / "robustness.csv")
    random_rows = [r for r in rows if r["scenario"] == "random" and r["imputation"] == "False"]
    assert [float(r["masking_rate"]) for r in random_rows] == params.evaluate.masking_rates
    subsets = {"subset_image", "subset_text", "subset_tabular", "subset_image+text", "subset_image+tabular",
               "subset_text+tabular", "subset_image+text+tabular"}
    assert {r["scenario"] for r in rows} == {"random", "absent_image", "absent_text", "absent_tabular"} | subsets
    everything = next(r for r in metrics["robustness"]
                      if r["scenario"] == "subset_image+text+tabular" and not r["imputation"])
    assert everything["auc_macro"] == auc["value"] and everything["masked_fraction"] == 0.0  # all shown
    only_image = next(r for r in metrics["robustness"] if r["scenario"] == "subset_image" and not r["imputation"])
    assert only_image["n_patients"] == int(present[:, 0].sum())  # scored: the patients who have an image
    assert {r["imputation"] for r in rows} == {"False", "True"}
    for row in random_rows:  # exact when feasible: everyone here has ≤ 3 modalities, so up to 2/3
        if float(row["masking_rate"]) <= 0.6:
            assert abs(float(row["masked_fraction"]) - float(row["masking_rate"])) < 0.01
    curve = read_csv(tmp_path / "evaluate" / "robustness_curve.csv")
    assert len(curve) == len(params.evaluate.masking_rates)
    assert (tmp_path / "evaluate" / "robustness.png").stat().st_size > 1000
    assert "registry_gate" not in metrics  # the gate is its own stage (promote)
