"""Verdicts come from intervals: a clear win, a clear loss, an overlap, and what was not measured."""

from __future__ import annotations

import json
import math

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
    estimates = suite_estimates(y, probs, rare_class=None, n_bootstrap=200, seed=0, n_seeds=3)
    rows = {row.key: row for row in claims_table(estimates)}
    assert rows["fusion_beats_unimodal"].verdict is Verdict.SUPPORTED
    assert rows["fusion_beats_unimodal"].note == "best unimodal on test: text_only; 3 seeds"
    assert rows["masking_keeps_accuracy_at_80"].verdict is Verdict.SUPPORTED
    assert rows["ontology_attention_helps"].verdict is Verdict.NOT_SUPPORTED  # [0, 0] is no gain
    assert rows["diffusion_imputation_helps"].value == 0.0
    assert rows["diffusion_objective_helps"].verdict is Verdict.INCONCLUSIVE
    assert rows["diffusion_objective_helps"].note.startswith("not measured")
    assert rows["rare_gain_at_high_missingness"].note == "not measured: no rare class in the data"
