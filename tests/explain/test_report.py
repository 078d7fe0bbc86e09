"""The explain stage end to end on the tiny trained model: metrics.json, the self-contained report with its
review form, MLflow, and the KFP HTML artifact."""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest

from meddiff.explain.figures import PLANES
from meddiff.explain.html_report import LIKERT_ITEMS, ehr_bars, highlight_tokens
from meddiff.explain.localisation import SCORES
from meddiff.explain.report import PRIORS, run_explain
from meddiff.explain.summary import visible_lesions
from meddiff.stages import run_component


@pytest.fixture(scope="module")
def explained(trained_tiny, tmp_path_factory: pytest.TempPathFactory) -> dict:
    report = tmp_path_factory.mktemp("explain") / "report"
    result = run_explain(trained_tiny["params"], trained_tiny["processed"], trained_tiny["models"], report)
    return {
        "result": result,
        "metrics": json.loads((report / "metrics.json").read_text()),
        "html": (report / "index.html").read_text(),
        "report": report,
    }


def test_scores_are_the_means_of_the_patients(explained, trained_tiny) -> None:
    params, data = trained_tiny["params"], trained_tiny["data"]
    metrics, result = explained["metrics"], explained["result"]
    lesion = [p for p in metrics["patients"] if p["scores"] is not None]
    healthy = [p for p in metrics["patients"] if p["scores"] is None]
    assert result.n_patients == metrics["n_patients"] == len(lesion) == params.explain.n_patients
    assert result.n_healthy == metrics["n_healthy"] == len(healthy) > 0
    assert set(metrics["localisation"]) == {*params.explain.methods, *PRIORS}
    shown = metrics["localisation"][params.explain.method]["all"]
    assert set(shown) == set(SCORES)
    for score in SCORES:
        assert np.isclose(shown[score]["value"], np.mean([p["scores"][score] for p in lesion]))
        assert shown[score]["ci_low"] <= shown[score]["value"] <= shown[score]["ci_high"]
    assert result.pointing_game == shown["pointing"]["value"] and result.dice_topk == shown["dice_topk"]["value"]
    for patient in metrics["patients"]:
        row = int(np.flatnonzero(data.arrays["patient_id"] == patient["patient_id"])[0])
        assert data.arrays["split"][row] == "test"
        assert patient["true"] == data.class_names[int(data.arrays["label"][row])]
        assert (patient["scores"] is None) == (patient["true"] == "healthy")
        assert patient["lesion_voxels"] == int(data.arrays["lesion_mask"][row].sum())
        assert np.isclose(sum(patient["modality_share"].values()), 1.0) or sum(patient["modality_share"].values()) == 0
        assert 0.0 < patient["probability"] < 1.0
    # the tiny data records no lesion contrast: the visible subset is said to be unavailable, not guessed
    assert metrics["visible_subset"].startswith("not available") and metrics["n_visible"] is None
    assert metrics["calibration"].startswith("temperature scaling") and metrics["temperature"] > 0
    for method in params.explain.methods:
        faithful = metrics["faithfulness"][method]
        assert -1.0 <= faithful["modality_agreement"]["spearman_pooled"] <= 1.0
        assert set(faithful["deletion"]) <= {"image", "text", "tabular"} and "image" in faithful["deletion"]
        assert len(faithful["deletion"]["image"]["curve"]) == len(params.explain.deletion_fractions)


def test_report_is_self_contained_with_three_planes_and_the_review_form(explained, trained_tiny) -> None:
    html, metrics = explained["html"], explained["metrics"]
    drawn = metrics["patients"][: trained_tiny["params"].explain.n_figures]
    assert "<form id=review" in html and "saveReview" in html and "application/json" in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # nothing fetched from the network
    for patient in drawn:
        pid = patient["patient_id"]
        for plane, _ in PLANES:
            assert f'alt="{plane} slice of {pid}"' in html
        for item in LIKERT_ITEMS:
            assert html.count(f'name="{pid}__{item}"') == 6  # five Likert points and n/a
        assert f'data-patient="{pid}"' in html
    assert html.count("data:image/png;base64,") == 3 * len(drawn)
    assert "Method comparison" in html and "Healthy patients" in html and "Faithfulness" in html
    assert list(explained["report"].iterdir()) and {p.name for p in explained["report"].iterdir()} == {
        "index.html", "metrics.json"}


def test_report_is_logged_to_mlflow(explained, trained_tiny) -> None:
    params = trained_tiny["params"]
    mlflow.set_tracking_uri(params.tracking.tracking_uri)
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="attributes.run_name = 'explain'")
    assert len(runs) >= 1
    parent = json.loads((trained_tiny["models"] / "run.json").read_text())["mlflow_run_id"]
    assert (runs["tags.mlflow.parentRunId"] == parent).any()
    run_id = runs["run_id"].iloc[0]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "explain")}
    assert {"explain/index.html", "explain/metrics.json"} <= artifacts
    method = params.explain.method
    logged = runs[f"metrics.{method}.pointing"].iloc[0]
    assert logged == explained["metrics"]["localisation"][method]["all"]["pointing"]["value"]


@dataclass
class _Artifact:
    path: str


def test_kfp_component_returns_the_report_as_html(trained_tiny, tmp_path: Path) -> None:
    params = trained_tiny["params"]
    html = _Artifact(str(tmp_path / "html" / "page"))
    report = _Artifact(str(tmp_path / "report"))
    result = run_component(
        "explain", json.dumps(params.to_dict()), html=html, processed=_Artifact(str(trained_tiny["processed"])),
        model=_Artifact(str(trained_tiny["models"])), report=report,
    )
    assert Path(html.path).read_text() == (Path(report.path) / "index.html").read_text()
    assert result["n_patients"] == params.explain.n_patients


def test_visible_subset_uses_the_recorded_contrast() -> None:
    arrays = {"lesion_contrast_hu": np.array([np.nan, 4.0, 10.0, 25.0])}
    np.testing.assert_array_equal(visible_lesions(arrays, np.array([0, 1, 2, 3]), 10.0), [False, False, True, True])
    assert visible_lesions({}, np.array([0]), 10.0) is None


def test_html_pieces() -> None:
    bars = ehr_bars([("wbc", 0.5), ("crp", 0.25)])
    assert bars.startswith("<svg") and 'width="220.0"' in bars and 'width="110.0"' in bars
    assert highlight_tokens(["a", "<b>"], [1.0, 0.5]).count("rgba(255,120,0,") == 2
    assert "&lt;b&gt;" in highlight_tokens(["<b>"], [1.0])
