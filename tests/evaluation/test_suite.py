import json

import numpy as np
import pytest

from meddiff.config import apply_overrides
from meddiff.data.dataset import ProcessedDataset
from meddiff.evaluation.suite import _late_fusion, _needed, render_summary, run_suite


def test_variants_pull_in_what_they_are_derived_from() -> None:
    assert _needed(["late_fusion"]) == ["image_only", "text_only", "tabular_only"]
    assert _needed(["no_imputation", "no_masking"]) == ["no_masking", "full"]
    assert _needed(["diffmic"]) == []
    with pytest.raises(ValueError, match="unknown variants \\['fancy'\\]"):
        _needed(["full", "fancy"])


def test_late_fusion_averages_the_unimodal_models_a_patient_can_use() -> None:
    constant = {
        "image_only": np.array([0.7, 0.3]),
        "text_only": np.array([0.1, 0.9]),
        "tabular_only": np.array([0.4, 0.6]),
    }
    predictors = {
        name: (lambda data, index, present, impute, p=p: np.tile(p, (len(index), 1))) for name, p in constant.items()
    }
    present = np.array([[True, True, True], [True, False, False], [False, True, True]])
    probs = _late_fusion(predictors)(ProcessedDataset({}), np.arange(3), present, False)
    np.testing.assert_allclose(probs, [[0.4, 0.6], [0.7, 0.3], [0.25, 0.75]])


def test_summary_calls_the_fused_model_higher_only_when_the_intervals_separate() -> None:
    def row(variant: str, auc: float, ci: list[float]) -> dict:
        return {"variant": variant, "auc": auc, "auc_ci": ci}

    unimodal = [row("image_only", 0.70, [0.60, 0.78]), row("text_only", 0.75, [0.66, 0.82])]
    separated = render_summary([row("full", 0.90, [0.85, 0.95]), *unimodal], [], 5)
    assert "best unimodal (text_only)" in separated and "the fused model is higher." in separated
    overlapping = render_summary([row("full", 0.80, [0.70, 0.88]), *unimodal], [], 5)
    assert "the fused model is higher, but the intervals overlap." in overlapping
    lower = render_summary([row("full", 0.72, [0.62, 0.80]), *unimodal], [], 5)
    assert "the fused model is not higher." in lower


def test_suite_trains_variants_and_writes_the_table(tiny_processed, tiny_params, tmp_path) -> None:
    processed, _ = tiny_processed
    params = apply_overrides(tiny_params, [
        "evaluate.suite=[full, no_masking, image_only, text_only, tabular_only, late_fusion, no_imputation, diffmic]",
        "evaluate.suite_epochs=1",
        "evaluate.n_bootstrap=50",
        f"paths.checkpoints={tmp_path}/checkpoints",
    ])
    result = run_suite(params, processed, tmp_path / "evaluate")
    assert [row["variant"] for row in result.table] == params.evaluate.suite
    suite = json.loads((tmp_path / "evaluate" / "suite.json").read_text())
    assert suite["epochs"] == 1
    for row in suite["table"]:
        # Masking rate 0 masks nothing: the sweep's first point is the unmasked test AUC, with the
        # same imputation setting and seed, for every variant alike.
        assert row["auc@0.0"] == row["auc"], row["variant"]
        assert [key for key in row if key.startswith("auc@")] == [f"auc@{r:.1f}" for r in params.evaluate.masking_rates]
    details = suite["details"]
    assert details["full"]["imputation"] and not details["no_imputation"]["imputation"]
    assert not any(details[v]["imputation"] for v in ("late_fusion", "diffmic"))
    markdown = (tmp_path / "evaluate" / "suite.md").read_text()
    for variant in params.evaluate.suite:
        assert f"| {variant} |" in markdown
    summary = (tmp_path / "evaluate" / "summary.md").read_text()
    assert "Fused vs best unimodal" in summary
    assert "| 0.6 |" in summary and "| 0.8 |" in summary
    assert "<td>late_fusion</td>" in (tmp_path / "evaluate" / "suite.html").read_text()
