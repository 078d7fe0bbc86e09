import csv
import json
from pathlib import Path

import numpy as np

from meddiff.evaluation.evaluate import run_evaluate


def read_csv(path: Path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_evaluate_writes_metrics_sweep_and_gate(trained_tiny, tmp_path) -> None:
    params = trained_tiny["params"]
    result = run_evaluate(params, trained_tiny["processed"], trained_tiny["models"], tmp_path / "evaluate")
    metrics = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    auc = metrics["test"]["auc_macro"]
    assert auc["ci_low"] <= auc["value"] <= auc["ci_high"]
    assert auc["value"] == result.test_auc_macro
    assert {"ece", "balanced_accuracy", "auc_per_class"} <= set(metrics["test"])
    assert metrics["subgroup"]["n_subgroup"] + metrics["subgroup"]["n_rest"] == result.n_test
    rows = read_csv(tmp_path / "evaluate" / "robustness.csv")
    random_rows = [r for r in rows if r["scenario"] == "random" and r["imputation"] == "False"]
    assert [float(r["masking_rate"]) for r in random_rows] == params.evaluate.masking_rates
    assert {r["scenario"] for r in rows} == {"random", "absent_image", "absent_text", "absent_tabular"}
    assert {r["imputation"] for r in rows} == {"False", "True"}
    for row in random_rows:  # exact when feasible: everyone here has ≤ 3 modalities, so up to 2/3
        if float(row["masking_rate"]) <= 0.6:
            assert abs(float(row["masked_fraction"]) - float(row["masking_rate"])) < 0.01
    curve = read_csv(tmp_path / "evaluate" / "robustness_curve.csv")
    assert len(curve) == len(params.evaluate.masking_rates)
    assert (tmp_path / "evaluate" / "robustness.png").stat().st_size > 1000
    assert metrics["registry_gate"]["promoted"] in (True, False)


def test_gate_promotes_and_refuses(trained_tiny) -> None:
    from mlflow.tracking import MlflowClient

    from meddiff.evaluation.gate import champion_gate

    params = trained_tiny["params"]
    data = trained_tiny["data"]
    index = data.indices("test")
    client = MlflowClient(tracking_uri=params.tracking.tracking_uri)
    name = params.tracking.registered_model
    first = client.get_model_version_by_alias(name, "candidate")
    if any(alias == "champion" for alias in first.aliases):
        client.delete_registered_model_alias(name, "champion")
    decision = champion_gate(params, str(first.version), 0.5, data, index)
    assert decision.promoted and decision.reason == "no champion yet"
    # A second version of the same model: the champion is rescored on this test split.
    second = client.create_model_version(name, first.source, run_id=first.run_id)
    refused = champion_gate(params, str(second.version), 0.0, data, index)
    assert not refused.promoted
    assert refused.champion_auc_source == "rescored on this test split"
    assert np.isfinite(refused.champion_auc)
    assert client.get_model_version_by_alias(name, "champion").version == first.version
    promoted = champion_gate(params, str(second.version), 1.01, data, index)
    assert promoted.promoted
    assert str(client.get_model_version_by_alias(name, "champion").version) == str(second.version)
