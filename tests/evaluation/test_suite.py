import json

from meddiff.config import apply_overrides
from meddiff.evaluation.suite import run_suite


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
        assert 0.0 <= row["auc"] <= 1.0
        assert "auc@0.8" in row
    markdown = (tmp_path / "evaluate" / "suite.md").read_text()
    assert "| late_fusion |" in markdown
    summary = (tmp_path / "evaluate" / "summary.md").read_text()
    assert "Fused vs best unimodal" in summary
    assert "| 0.6 |" in summary and "| 0.8 |" in summary
    assert (tmp_path / "evaluate" / "suite.html").is_file()
