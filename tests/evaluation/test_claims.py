"""Verdicts come from intervals: a clear win, a clear loss, an overlap, and what was not measured."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from meddiff.evaluation.claims import (
    CLAIMS,
    Claim,
    Direction,
    Estimate,
    Verdict,
    claims_table,
    decide,
    render_markdown,
    seed_pooled_difference,
    stage_estimates,
    to_json,
)
from meddiff.intervals import paired_difference
from meddiff.metrics import auc_macro

GAIN = Claim("gain", "A beats B", "test", "AUC(A) − AUC(B)", Direction.ABOVE, 0.0, "paired")
FID = Claim("fid", "FID < 30", "test", "FID", Direction.BELOW, 30.0, "bootstrap")


@pytest.mark.parametrize(
    ("claim", "interval", "verdict"),
    [
        (GAIN, (0.04, 0.01, 0.07), Verdict.SUPPORTED),  # a clear win: the whole interval above 0
        (GAIN, (-0.05, -0.08, -0.02), Verdict.NOT_SUPPORTED),  # a clear loss
        (GAIN, (0.02, -0.01, 0.05), Verdict.INCONCLUSIVE),  # the interval straddles 0
        (GAIN, (0.0, -0.03, 0.0), Verdict.NOT_SUPPORTED),  # touching the threshold from below is no win
        (FID, (12.0, 9.0, 16.0), Verdict.SUPPORTED),
        (FID, (42.9, 38.0, 47.5), Verdict.NOT_SUPPORTED),
        (FID, (29.0, 25.0, 33.0), Verdict.INCONCLUSIVE),
    ],
)
def test_verdict_follows_the_interval(claim: Claim, interval: tuple[float, float, float], verdict: Verdict) -> None:
    assert decide(Estimate(*interval), claim) is verdict


def test_point_estimate_alone_decides_nothing() -> None:
    # a large point gain with an interval that reaches below 0 is still inconclusive
    assert decide(Estimate(0.10, -0.01, 0.21), GAIN) is Verdict.INCONCLUSIVE
    assert decide(Estimate(0.10, math.nan, math.nan), GAIN) is Verdict.INCONCLUSIVE


def test_reversed_interval_is_an_error() -> None:
    with pytest.raises(ValueError, match="reversed"):
        decide(Estimate(0.1, 0.2, 0.0), GAIN)


def test_table_has_every_claim_and_marks_the_unmeasured() -> None:
    rows = claims_table({"fid_below_30": Estimate(42.9, 38.0, 47.5, n=96)})
    assert [row.key for row in rows] == [claim.key for claim in CLAIMS]
    by_key = {row.key: row for row in rows}
    assert by_key["fid_below_30"].verdict is Verdict.NOT_SUPPORTED
    assert by_key["attribution_dice_above_07"].verdict is Verdict.INCONCLUSIVE
    assert by_key["attribution_dice_above_07"].note == "not measured in this run"
    payload = to_json(rows)
    json.dumps(payload, allow_nan=False)  # NaN became null: strict JSON
    assert payload[[c.key for c in CLAIMS].index("fid_below_30")]["verdict"] == "not supported"
    assert "| **not supported** |" in render_markdown(rows)


def test_unknown_claim_key_is_refused() -> None:
    with pytest.raises(KeyError, match="unknown claims"):
        claims_table({"fusion_beats_unimodel": Estimate(0.1, 0.05, 0.15)})


def test_paired_difference_is_tighter_than_two_independent_intervals() -> None:
    rng = np.random.default_rng(0)
    n = 300
    y = rng.integers(0, 2, n)
    shared = rng.normal(size=n)  # patient difficulty shared by both models
    score_a = y * 1.2 + shared + rng.normal(scale=0.3, size=n)
    score_b = y * 1.0 + shared + rng.normal(scale=0.3, size=n)
    probs_a = np.stack([1 - (s := 1 / (1 + np.exp(-score_a))), s], axis=1)
    probs_b = np.stack([1 - (t := 1 / (1 + np.exp(-score_b))), t], axis=1)
    diff = paired_difference(y, probs_a, probs_b, auc_macro, n_resamples=300, seed=1)
    assert diff["value"] == pytest.approx(auc_macro(y, probs_a) - auc_macro(y, probs_b))
    assert diff["ci_low"] <= diff["value"] <= diff["ci_high"]
    # the width of the paired interval is far below the sum of the two unpaired half-widths
    from meddiff.intervals import bootstrap_ci

    a = bootstrap_ci(y, probs_a, auc_macro, 300, 1)
    b = bootstrap_ci(y, probs_b, auc_macro, 300, 1)
    unpaired_width = (a["ci_high"] - a["ci_low"]) / 2 + (b["ci_high"] - b["ci_low"]) / 2
    assert diff["ci_high"] - diff["ci_low"] < 0.6 * unpaired_width
    # the same model against itself: exactly zero, no spread
    same = paired_difference(y, probs_a, probs_a, auc_macro, n_resamples=50, seed=1)
    assert (same["value"], same["ci_low"], same["ci_high"]) == (0.0, 0.0, 0.0)


def test_paired_difference_needs_the_same_patients() -> None:
    with pytest.raises(ValueError, match="one row per patient"):
        paired_difference(np.zeros(3), np.zeros((3, 2)), np.zeros((4, 2)), auc_macro)


def _probs(y: np.ndarray, strength: float, rng: np.random.Generator, noise: np.ndarray) -> np.ndarray:
    """Two-class probabilities whose separation grows with ``strength``; ``noise`` shared across models."""
    score = (2 * y - 1) * strength + noise + rng.normal(scale=0.2, size=len(y))
    p = 1 / (1 + np.exp(-score))
    return np.stack([1 - p, p], axis=1)


def test_suite_estimates_decide_the_suite_claims() -> None:
    from meddiff.evaluation.claims import suite_estimates

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 400)
    noise = rng.normal(size=400)
    strong, weak = _probs(y, 2.0, rng, noise), _probs(y, 0.3, rng, noise)
    probs = {
        "full": {"0.0": strong, "0.8": strong, "0.6": strong, "0.6+imputation": strong},
        "text_only": {"0.0": weak},
        "image_only": {"0.0": _probs(y, 0.1, rng, noise)},
        "no_masking": {"0.8": weak},
        "no_ontology": {"0.0": strong},  # the same predictions as full: a difference of exactly 0
    }
    estimates = suite_estimates(y, probs, rare_class=None, n_bootstrap=200, seed=0)
    rows = {row.key: row for row in claims_table(estimates)}
    assert rows["fusion_beats_unimodal"].verdict is Verdict.SUPPORTED
    assert rows["fusion_beats_unimodal"].note == "best unimodal on test: text_only; 1 seed"
    assert rows["masking_keeps_accuracy_at_80"].verdict is Verdict.SUPPORTED
    assert rows["ontology_attention_helps"].verdict is Verdict.NOT_SUPPORTED  # [0, 0] is no gain
    assert rows["diffusion_imputation_helps"].value == 0.0
    assert rows["diffusion_objective_helps"].verdict is Verdict.INCONCLUSIVE
    assert rows["diffusion_objective_helps"].note.startswith("not measured")
    assert rows["rare_gain_at_high_missingness"].note == "not measured: no rare class in the data"


def test_one_seed_and_one_mask_is_the_paired_difference_draw_for_draw() -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 120)
    noise = rng.normal(size=120)
    a, b = _probs(y, 1.0, rng, noise), _probs(y, 0.6, rng, noise)
    assert seed_pooled_difference(y, a, b, auc_macro, 200, 7) == {
        **paired_difference(y, a, b, auc_macro, 200, 7), "n_seeds": 1
    }
    # the same masks repeated add no information: a drawn patient brings all its rows (cluster bootstrap)
    twice = seed_pooled_difference(y, np.stack([a, a])[None], np.stack([b, b])[None], auc_macro, 200, 7)
    once = seed_pooled_difference(y, a, b, auc_macro, 200, 7)
    assert (twice["value"], twice["ci_low"], twice["ci_high"]) == pytest.approx(
        (once["value"], once["ci_low"], once["ci_high"])
    )


def test_seeds_are_pooled_by_averaging_their_paired_differences() -> None:
    rng = np.random.default_rng(6)
    y = rng.integers(0, 2, 200)
    noise = rng.normal(size=200)
    good, poor, baseline = _probs(y, 2.0, rng, noise), _probs(y, 0.2, rng, noise), _probs(y, 0.8, rng, noise)
    pooled = seed_pooled_difference(y, np.stack([good, poor]), np.stack([baseline, baseline]), auc_macro, 300, 0)
    per_seed = [auc_macro(y, p) - auc_macro(y, baseline) for p in (good, poor)]
    assert per_seed[0] > 0 > per_seed[1]  # one seed wins, the other loses
    assert pooled["value"] == pytest.approx(np.mean(per_seed))
    assert pooled["n_seeds"] == 2
    # resampling the seeds carries their disagreement into the interval: it reaches both seeds' values
    assert pooled["ci_low"] < per_seed[1] + 0.02 and pooled["ci_high"] > per_seed[0] - 0.02
    assert decide(Estimate.from_interval(pooled), GAIN) is Verdict.INCONCLUSIVE
    # two seeds that agree: the same mean, a far narrower interval
    agreeing = seed_pooled_difference(y, np.stack([good, good]), np.stack([baseline, baseline]), auc_macro, 300, 0)
    assert agreeing["ci_high"] - agreeing["ci_low"] < 0.5 * (pooled["ci_high"] - pooled["ci_low"])


def test_pooling_needs_the_same_seeds_masks_and_patients() -> None:
    with pytest.raises(ValueError, match="same seeds, masks and patients"):
        seed_pooled_difference(np.zeros(3), np.zeros((2, 3, 2)), np.zeros((3, 3, 2)), auc_macro)
    with pytest.raises(ValueError, match="N = 3 patients"):
        seed_pooled_difference(np.zeros(3), np.zeros((2, 4, 2)), np.zeros((2, 4, 2)), auc_macro)


def test_claims_of_other_stages_are_read_from_their_reports(tmp_path: Path) -> None:
    absent = stage_estimates(tmp_path, n_bootstrap=20, seed=0)
    rows = {row.key: row for row in claims_table(absent)}
    for key, stage in (("fid_below_30", "generate"), ("attribution_dice_above_07", "explain"),
                       ("no_subgroup_left_behind", "evaluate")):
        assert rows[key].verdict is Verdict.INCONCLUSIVE
        assert rows[key].note.startswith(f"not measured: {tmp_path / stage}/")
        assert rows[key].note.endswith(f"is absent (run `meddiff {stage}` first)")

    rng = np.random.default_rng(0)
    (tmp_path / "generate").mkdir()
    real = rng.normal(size=(80, 4))
    np.savez(tmp_path / "generate" / "latents.npz", synthetic=real[:40] + 0.05 * rng.normal(size=(40, 4)),
             synthetic_labels=np.zeros(40), real_test=real)
    (tmp_path / "explain").mkdir()
    dice = {"value": 0.41, "ci_low": 0.33, "ci_high": 0.49, "n_valid": 500, "n": 16}
    (tmp_path / "explain" / "metrics.json").write_text(json.dumps(
        {"method": "integrated_gradients", "n_patients": 16, "localisation": {"integrated_gradients": {"all": {
            "dice_topk": dice}}}}
    ))
    (tmp_path / "evaluate").mkdir()
    (tmp_path / "evaluate" / "metrics.json").write_text(json.dumps({"subgroup": {
        "applicable": True, "site": "site_b", "n_subgroup": 10, "n_rest": 70,
        "auc_gap": {"value": 0.02, "ci_low": -0.10, "ci_high": 0.15}}}))
    rows = {row.key: row for row in claims_table(stage_estimates(tmp_path, n_bootstrap=50, seed=0))}
    fid = rows["fid_below_30"]
    # the resampled distances sit above the point (resampling duplicates points): conservative for "< 30"
    assert fid.verdict is Verdict.SUPPORTED and 0 <= fid.value <= fid.ci_high < 30
    assert (rows["attribution_dice_above_07"].value, rows["attribution_dice_above_07"].n) == (0.41, 16)
    assert rows["attribution_dice_above_07"].verdict is Verdict.NOT_SUPPORTED
    assert rows["no_subgroup_left_behind"].verdict is Verdict.INCONCLUSIVE
    assert rows["no_subgroup_left_behind"].note.startswith("internal test split, site site_b: 10 patients vs 70")
    # the external drop, once scored, decides the subgroup claim (10 minority-site patients cannot)
    (tmp_path / "external").mkdir()
    (tmp_path / "external" / "metrics.json").write_text(json.dumps({"subgroup": {
        "applicable": True, "site": "site_b", "n_subgroup": 240, "n_rest": 1760,
        "auc_gap": {"value": 0.01, "ci_low": -0.01, "ci_high": 0.03}}}))
    subgroup = claims_table(stage_estimates(tmp_path, n_bootstrap=20, seed=0))[-1]
    assert (subgroup.key, subgroup.n, subgroup.verdict) == ("no_subgroup_left_behind", 2000, Verdict.SUPPORTED)
    assert subgroup.note.startswith("external drop, site site_b: 240 patients vs 1760")
    (tmp_path / "external" / "metrics.json").unlink()

    (tmp_path / "evaluate" / "metrics.json").write_text(json.dumps({"subgroup": {
        "applicable": False, "reason": "no test patient from site 'site_b'"}}))
    (tmp_path / "generate" / "latents.npz").unlink()
    (tmp_path / "generate" / "metrics.json").write_text(json.dumps({"frechet_distance": 12.5}))
    rows = {row.key: row for row in claims_table(stage_estimates(tmp_path, n_bootstrap=20, seed=0))}
    assert rows["no_subgroup_left_behind"].note == ("not measured (internal test split): no test patient from site "
                                                    "'site_b'")
    assert rows["fid_below_30"].value == 12.5 and rows["fid_below_30"].verdict is Verdict.INCONCLUSIVE
    assert rows["fid_below_30"].note.startswith("no interval:")
