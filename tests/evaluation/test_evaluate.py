import csv
import json

from meddiff.evaluation.evaluate import run_evaluate


def test_evaluate_writes_metrics_and_sweep(trained_tiny, tmp_path) -> None:
    params = trained_tiny["params"]
    result = run_evaluate(params, trained_tiny["processed"], trained_tiny["models"], tmp_path / "evaluate")
    metrics = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["auc_macro"] <= 1.0
    assert metrics["test"]["auc_macro"] == result.test_auc_macro
    rows = list(csv.DictReader(open(tmp_path / "evaluate" / "robustness.csv")))
    assert [float(r["masking_rate"]) for r in rows] == params.evaluate.masking_rates
    fractions = [float(r["masked_fraction"]) for r in rows]
    assert fractions[0] == 0.0 and fractions == sorted(fractions) and fractions[-1] > 0.4
    assert (tmp_path / "evaluate" / "robustness.png").stat().st_size > 1000
