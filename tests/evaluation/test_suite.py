import json

import numpy as np
import pytest
import torch

from meddiff.config import apply_overrides
from meddiff.data.dataset import ProcessedDataset
from meddiff.evaluation.claims import CLAIMS, Verdict
from meddiff.evaluation.knn_imputation import LatentNeighbours
from meddiff.evaluation.robustness import modality_subsets
from meddiff.evaluation.suite import _late_fusion, _memoised, _needed, run_suite
from tests.conftest import make_tiny_processed


def test_variants_pull_in_what_they_are_derived_from() -> None:
    assert _needed(["late_fusion"]) == ["image_only", "text_only", "tabular_only"]
    assert _needed(["no_imputation", "no_masking"]) == ["no_masking", "full"]
    assert _needed(["diffmic"]) == []
    assert _needed(["knn_imputation"]) == ["full"]
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


def test_nearest_neighbours_impute_the_missing_latent_from_the_present_ones() -> None:
    # training latents (N=4, M=3, d=2): the text latent (modality 1) mirrors the image latent (modality 0)
    image = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]])
    latents = torch.stack([image, 2 * image, torch.zeros(4, 2)], dim=1)
    present = torch.tensor([[True, True, False], [True, True, False], [True, True, False], [True, False, False]])
    neighbours = LatentNeighbours(latents, present, k=2)
    query = torch.stack([torch.tensor([[5.2, 5.0], [0.0, 0.0]]), torch.full((2, 2), 9.0), torch.zeros(2, 2)], dim=1)
    shown = torch.tensor([[True, False, False], [True, True, False]])
    imputed = neighbours.impute(query, shown)
    # patient 0 has only the image: its text latent is the mean over the 2 nearest with a text latent
    # (patients 2 and 1; patient 3 is nearer but has no text)
    torch.testing.assert_close(imputed[0, 1], (latents[2, 1] + latents[1, 1]) / 2)
    torch.testing.assert_close(imputed[1, :2], query[1, :2])  # present modalities keep their latents
    # no training patient has the tabular latent: it stays as given (the missing-modality token is used)
    torch.testing.assert_close(imputed[:, 2], query[:, 2])


def test_a_model_is_asked_once_per_patients_masks_and_imputation() -> None:
    calls = []

    def predict(data: ProcessedDataset, index: np.ndarray, present: np.ndarray, impute: bool) -> np.ndarray:
        calls.append(impute)
        return np.full((len(index), 2), 0.5)

    remembered = _memoised(predict)
    present = np.ones((3, 3), bool)
    for impute in (False, False, True):
        remembered(ProcessedDataset({}), np.arange(3), present, impute)
    remembered(ProcessedDataset({}), np.arange(3), ~present, False)
    assert calls == [False, True, False]


def test_suite_trains_seeds_and_writes_the_table_and_the_claims(tiny_processed, tiny_params, tmp_path) -> None:
    processed, _ = tiny_processed
    params = apply_overrides(tiny_params, [
        "evaluate.suite=[full, no_masking, image_only, text_only, tabular_only, late_fusion, no_imputation, "
        "knn_imputation]",
        "evaluate.suite_epochs=1",
        "evaluate.suite_seeds=2",
        "evaluate.masking_rates=[0.0, 0.6, 0.8]",
        "evaluate.n_bootstrap=50",
        "evaluate.rare_classes=[rare_c]",
        f"paths.checkpoints={tmp_path}/checkpoints",
        f"paths.reports={tmp_path}/reports",
    ])
    # an external drop admitted by `meddiff external` (here: toy data from another seed) decides the rare claim
    make_tiny_processed(tmp_path / "external" / "processed", n=96, seed=3)
    result = run_suite(params, processed, tmp_path / "external", tmp_path / "evaluate")
    assert [row["variant"] for row in result.table] == params.evaluate.suite
    suite = json.loads((tmp_path / "evaluate" / "suite.json").read_text())
    assert (suite["epochs"], suite["seeds"]) == (1, [params.seed, params.seed + 1])
    for row in suite["table"]:
        per_seed = [s["test"]["auc_macro"]["value"] for s in suite["details"][row["variant"]]["seeds"]]
        assert row["n_seeds"] == 2 and row["auc"] == pytest.approx(np.mean(per_seed)), row["variant"]
        assert row["auc_sd"] == pytest.approx(np.std(per_seed, ddof=1))
        assert len(row["auc_seed_ci"]) == 2
        # Masking rate 0 masks nothing: the sweep's first point is the unmasked test AUC, with the
        # same imputation setting and seed, for every variant alike.
        assert row["auc@0.0"] == pytest.approx(row["auc"]), row["variant"]
        assert [key for key in row if key.startswith("auc@") and key[4].isdigit()] == [
            f"auc@{r:.1f}" for r in params.evaluate.masking_rates
        ]
        assert all(f"auc@{'+'.join(s)}" in row for s in modality_subsets())
    details = suite["details"]
    assert details["full"]["imputation"] and details["knn_imputation"]["imputation"]
    assert not any(details[v]["imputation"] for v in ("no_imputation", "late_fusion", "text_only"))
    assert set(suite["cpu_seconds"]) >= {"full", "text_only", "knn_imputation", "evaluation"}
    assert len(suite["cpu_seconds"]["full"]) == 2
    assert {(r["split"], r["scenario"]) for r in suite["imputation"]} >= {("val", "random@0.6"),
                                                                          ("test", "subset_image")}

    written = json.loads((tmp_path / "evaluate" / "claims.json").read_text())
    assert written["seeds"] == suite["seeds"]
    rows = {row["key"]: row for row in written["claims"]}
    assert list(rows) == [claim.key for claim in CLAIMS]
    assert all(row["verdict"] in {v.value for v in Verdict} for row in rows.values())
    fusion = rows["fusion_beats_unimodal"]
    assert fusion["value"] is not None and fusion["ci_low"] <= fusion["ci_high"] and "2 seeds" in fusion["note"]
    assert "3 masks per patient" not in rows["masking_keeps_accuracy_at_80"]["note"]  # n_repeats=1 in tiny params
    assert "validation: diffusion − token" in rows["diffusion_imputation_helps"]["note"]
    rare = rows["rare_gain_at_high_missingness"]
    assert rare["note"].startswith("external drop (96 patients, ") and rare["n"] == 96, rare
    # variants left out of this suite and stages that did not run: inconclusive, with the reason
    assert rows["ontology_attention_helps"]["verdict"] == "inconclusive"
    assert rows["ontology_attention_helps"]["note"].startswith("not measured: the suite has no")
    assert rows["fid_below_30"]["note"] == (
        f"not measured: {tmp_path}/reports/generate/latents.npz is absent (run `meddiff generate` first)"
    )
    assert result.claims == written["claims"]
    claims_md = (tmp_path / "evaluate" / "claims.md").read_text()
    assert "2 seed(s) per variant" in claims_md and claims_md.count("| **") == len(CLAIMS)
    markdown = (tmp_path / "evaluate" / "suite.md").read_text()
    for variant in params.evaluate.suite:
        assert f"| {variant} |" in markdown
    assert " ± " in markdown and "image+text+tabular (n=" in markdown
    summary = (tmp_path / "evaluate" / "summary.md").read_text()
    assert "| test macro AUC: full − best unimodal (paired) |" in summary
    assert "| val | subset_text |" in summary
    assert "<td>late_fusion</td>" in (tmp_path / "evaluate" / "suite.html").read_text()
