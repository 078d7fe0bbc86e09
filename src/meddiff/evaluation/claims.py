"""The proposal's claims, each with a number, an interval, a protocol and a verdict computed from the
interval (issue "evidence that can decide"; proposal §4 expected outcomes, §3.6 evaluation).

A claim is a statement about one measured quantity against a threshold: "full − best unimodal AUC
> 0", "FID < 30", "attribution Dice > 0.7". Its verdict follows from the quantity's 95 % interval
alone, never from the point estimate and never by hand:

* ``supported``: the whole interval lies on the claimed side of the threshold;
* ``not supported``: the whole interval lies on the other side (or touches the threshold from it);
* ``inconclusive``: the interval contains the threshold, or the quantity could not be measured
  (then the row says why, e.g. "not measured: the suite ran one seed").

:func:`claims_table` turns measured :class:`Estimate` values into rows; :func:`render_markdown` and
the JSON of :func:`to_json` are what ``reports/evaluate/claims.md`` / ``claims.json`` hold.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

import numpy as np

from meddiff.intervals import paired_difference
from meddiff.metrics import auc_macro, auc_one_vs_rest


class Verdict(StrEnum):
    SUPPORTED = "supported"
    NOT_SUPPORTED = "not supported"
    INCONCLUSIVE = "inconclusive"


class Direction(StrEnum):
    """Which side of the threshold the claim says the quantity is on."""

    ABOVE = ">"
    BELOW = "<"


@dataclass(frozen=True)
class Claim:
    """One claim: ``quantity <direction> threshold``, measured by ``protocol``."""

    key: str
    statement: str
    source: str  # where the proposal makes it
    quantity: str
    direction: Direction
    threshold: float
    protocol: str


@dataclass(frozen=True)
class Estimate:
    """A measured quantity: point value and 95 % interval, or why it is missing (``value`` NaN)."""

    value: float
    ci_low: float
    ci_high: float
    n: int = 0
    note: str = ""

    @classmethod
    def missing(cls, why: str) -> Estimate:
        return cls(math.nan, math.nan, math.nan, 0, why)

    @classmethod
    def from_interval(cls, interval: dict[str, float], n: int = 0, note: str = "") -> Estimate:
        """From a ``{"value", "ci_low", "ci_high"}`` dict as :mod:`meddiff.intervals` returns it."""
        return cls(float(interval["value"]), float(interval["ci_low"]), float(interval["ci_high"]), n, note)


def decide(estimate: Estimate, claim: Claim) -> Verdict:
    """The verdict of ``claim`` from the interval of ``estimate`` (see the module docstring)."""
    low, high = estimate.ci_low, estimate.ci_high
    if not (math.isfinite(low) and math.isfinite(high)):
        return Verdict.INCONCLUSIVE
    if low > high:
        raise ValueError(f"claim {claim.key!r}: interval [{low}, {high}] is reversed")
    if claim.direction is Direction.ABOVE:
        if low > claim.threshold:
            return Verdict.SUPPORTED
        return Verdict.NOT_SUPPORTED if high <= claim.threshold else Verdict.INCONCLUSIVE
    if high < claim.threshold:
        return Verdict.SUPPORTED
    return Verdict.NOT_SUPPORTED if low >= claim.threshold else Verdict.INCONCLUSIVE


#: The proposal's claims, in the order of its expected outcomes.
CLAIMS: tuple[Claim, ...] = (
    Claim("fusion_beats_unimodal", "Fusing imaging, text and EHR beats the best single modality",
          "§1 objective 1, §4 outcome 1", "test macro AUC: full − best unimodal (paired)", Direction.ABOVE, 0.0,
          "same test patients, paired bootstrap of the AUC difference"),
    Claim("masking_keeps_accuracy_at_80", "Modality masking keeps accuracy at 80 % missingness",
          "§3.3, §3.6 robustness", "test macro AUC at 80 % masking: masking-trained − no-masking (paired)",
          Direction.ABOVE, 0.0, "same patients and masks, paired bootstrap"),
    Claim("rare_gain_at_high_missingness", "+15 % AUC on rare-disease subsets at high missingness",
          "§4 outcome 1", "rare-class AUC at 80 % masking: full − best baseline (paired)", Direction.ABOVE, 0.15,
          "rare class one-vs-rest, 80 % masking, paired bootstrap"),
    Claim("diffusion_imputation_helps", "Diffusion imputation of missing latents helps",
          "§3.2 hierarchical diffusion", "test macro AUC at 60 % masking: with − without imputation (paired)",
          Direction.ABOVE, 0.0, "same patients and masks, paired bootstrap"),
    Claim("ontology_attention_helps", "Ontology-informed attention helps", "§3.4",
          "test macro AUC: full − no ontology prior (paired)", Direction.ABOVE, 0.0, "paired bootstrap"),
    Claim("diffusion_objective_helps", "The diffusion objective helps classification", "§3.2",
          "test macro AUC: full − classifier only (paired)", Direction.ABOVE, 0.0, "paired bootstrap"),
    Claim("fid_below_30", "Synthetic data reach FID < 30", "§4 outcome 2",
          "Fréchet distance of synthetic to real (declared feature space)", Direction.BELOW, 30.0,
          "bootstrap over real and synthetic samples"),
    Claim("attribution_dice_above_07", "Attribution maps align with lesions (Dice > 0.7)", "§4 outcome 3",
          "mean Dice of the shown method against lesion masks", Direction.ABOVE, 0.7,
          "test patients with a lesion, patient bootstrap"),
    Claim("no_subgroup_left_behind", "No subgroup is left behind", "§1 equity",
          "test macro AUC gap: rest − minority site", Direction.BELOW, 0.05, "bootstrap of the gap"),
)


@dataclass(frozen=True)
class ClaimRow:
    key: str
    statement: str
    source: str
    quantity: str
    claimed: str
    protocol: str
    value: float
    ci_low: float
    ci_high: float
    n: int
    note: str
    verdict: Verdict


def claims_table(estimates: dict[str, Estimate], claims: tuple[Claim, ...] = CLAIMS) -> list[ClaimRow]:
    """One row per claim; a claim without an estimate is inconclusive with "not measured".

    Raises:
        KeyError: an estimate for a claim that does not exist (a typo would silently drop evidence).
    """
    unknown = set(estimates) - {claim.key for claim in claims}
    if unknown:
        raise KeyError(f"estimates for unknown claims {sorted(unknown)}; claims are {[c.key for c in claims]}")
    rows = []
    for claim in claims:
        estimate = estimates.get(claim.key, Estimate.missing("not measured in this run"))
        rows.append(ClaimRow(
            claim.key, claim.statement, claim.source, claim.quantity,
            f"{claim.direction.value} {claim.threshold:g}", claim.protocol,
            estimate.value, estimate.ci_low, estimate.ci_high, estimate.n, estimate.note, decide(estimate, claim),
        ))
    return rows


def to_json(rows: list[ClaimRow]) -> list[dict[str, Any]]:
    """JSON-ready rows (NaN becomes ``None``)."""
    def clean(value: Any) -> Any:
        return None if isinstance(value, float) and not math.isfinite(value) else value

    return [{k: clean(v.value if isinstance(v, StrEnum) else v) for k, v in asdict(row).items()} for row in rows]


def render_markdown(rows: list[ClaimRow]) -> str:
    """The claims table as Markdown, one row per claim."""
    lines = [
        "# The proposal's claims, decided by their intervals",
        "",
        "| claim | quantity | claimed | measured [95 % CI] | n | verdict | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        measured = (f"{row.value:.3f} [{row.ci_low:.3f}, {row.ci_high:.3f}]" if math.isfinite(row.value)
                    else "—")
        lines.append(f"| {row.statement} ({row.source}) | {row.quantity} | {row.claimed} | {measured} | {row.n} "
                     f"| **{row.verdict.value}** | {row.note} |")
    lines += ["", "Verdicts come from the interval alone: supported when all of it lies on the claimed side of "
              "the threshold, not supported when all of it lies on the other side, inconclusive otherwise."]
    return "\n".join(lines) + "\n"


#: Suite variants compared with the full model, per claim (the first of each pair is "full").
PAIRED_AT_FULL_MASK = {
    "ontology_attention_helps": "no_ontology",
    "diffusion_objective_helps": "classifier_only",
}
UNIMODAL = ("image_only", "text_only", "tabular_only")
BASELINES = (*UNIMODAL, "late_fusion", "diffmic", "feature_lr")


def suite_estimates(
    y: np.ndarray,
    probs: dict[str, dict[str, np.ndarray]],
    rare_class: int | None,
    n_bootstrap: int,
    seed: int,
    n_seeds: int = 1,
) -> dict[str, Estimate]:
    """The suite's claims as paired differences on the same test patients.

    Args:
        y: (N,) test labels.
        probs: variant → condition → (N, classes) probabilities, where the condition is ``"0.0"`` (all
            modalities), ``"0.8"`` / ``"0.6"`` (the same random masks for every variant) or
            ``"0.6+imputation"``; a variant or condition missing from the suite leaves its claim unmeasured.
        rare_class: the rare class for the rare-subset claim (``None``: not measured).
        n_seeds: seeds behind each variant, written into every note.
    """
    seeds = f"{n_seeds} seed{'s' if n_seeds != 1 else ''}"
    n = len(y)

    def paired(a: str, b: str, condition: str, metric: Callable[[np.ndarray, np.ndarray], float], what: str,
               condition_b: str | None = None) -> Estimate:
        condition_b = condition_b or condition
        if condition not in probs.get(a, {}) or condition_b not in probs.get(b, {}):
            return Estimate.missing(f"not measured: the suite has no {a}@{condition} or {b}@{condition_b}")
        interval = paired_difference(y, probs[a][condition], probs[b][condition_b], metric, n_bootstrap, seed)
        return Estimate.from_interval(interval, n, f"{what}; {seeds}")

    def best(candidates: tuple[str, ...], condition: str, metric: Callable[[np.ndarray, np.ndarray], float]) -> str:
        present = [c for c in candidates if condition in probs.get(c, {})]
        return max(present, key=lambda c: metric(y, probs[c][condition])) if present else ""

    estimates: dict[str, Estimate] = {}
    unimodal = best(UNIMODAL, "0.0", auc_macro)
    estimates["fusion_beats_unimodal"] = paired(
        "full", unimodal, "0.0", auc_macro, f"best unimodal on test: {unimodal or 'none'}"
    )
    estimates["masking_keeps_accuracy_at_80"] = paired("full", "no_masking", "0.8", auc_macro, "80 % of slots masked")
    if rare_class is None:
        estimates["rare_gain_at_high_missingness"] = Estimate.missing("not measured: no rare class in the data")
    else:
        def rare_auc(t: np.ndarray, p: np.ndarray) -> float:
            return auc_one_vs_rest(t, p, rare_class)

        baseline = best(BASELINES, "0.8", rare_auc)
        estimates["rare_gain_at_high_missingness"] = paired(
            "full", baseline, "0.8", rare_auc, f"best baseline on the rare class: {baseline or 'none'}"
        )
    estimates["diffusion_imputation_helps"] = paired(
        "full", "full", "0.6+imputation", auc_macro, "60 % of slots masked, with against without imputation",
        condition_b="0.6",
    )
    for key, variant in PAIRED_AT_FULL_MASK.items():
        estimates[key] = paired("full", variant, "0.0", auc_macro, f"full − {variant}")
    return estimates
