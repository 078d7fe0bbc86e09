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
the JSON of :func:`to_json` are what ``reports/evaluate/claims.md`` / ``claims.json`` hold
(written by ``meddiff suite``). The suite's own claims come from :func:`suite_estimates` (paired
differences over seeds, :func:`seed_pooled_difference`); the claims of other stages from their
reports, by :func:`stage_estimates`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

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


def render_markdown(rows: list[ClaimRow], context: str = "") -> str:
    """The claims table as Markdown, one row per claim; ``context`` (how it was measured) goes above it."""
    lines = [
        "# The proposal's claims, decided by their intervals",
        "",
        *([context, ""] if context else []),
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


#: Suite variants compared with the full model without masking, per claim.
PAIRED_AT_FULL_MASK = {
    "ontology_attention_helps": "no_ontology",
    "diffusion_objective_helps": "classifier_only",
}
UNIMODAL = ("image_only", "text_only", "tabular_only")
BASELINES = (*UNIMODAL, "late_fusion", "diffmic", "feature_lr")
#: The suite's prediction conditions: no masking, random masking of 60 / 80 % of the modality slots
#: (learned missing-modality token, no imputation), and 60 % with diffusion imputation of the missing latents.
NO_MASKING, MASKED_60, MASKED_80, MASKED_60_IMPUTED = "0.0", "0.6", "0.8", "0.6+imputation"


def seed_mask_stack(probs: np.ndarray, n_patients: int) -> np.ndarray:
    """Predictions as (S, R, N, K): S seeds, R random masks per patient, N patients, K classes.

    (N, K) is one seed and one mask, (S, N, K) one mask per seed.

    Raises:
        ValueError: the array has another rank, or not ``n_patients`` rows per seed and mask.
    """
    probs = np.asarray(probs, dtype=float)
    if probs.ndim == 2:
        probs = probs[None, None]
    elif probs.ndim == 3:
        probs = probs[:, None]
    if probs.ndim != 4 or probs.shape[2] != n_patients:
        raise ValueError(f"predictions must be (N, K), (S, N, K) or (S, R, N, K) with N = {n_patients} patients, "
                         f"got shape {np.shape(probs)}")
    return probs


def seed_pooled_difference(
    y_true: np.ndarray,
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    metric: Callable[[np.ndarray, np.ndarray], float],
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, float]:
    """Mean over seeds of ``metric(A_s) − metric(B_s)`` on the same patients, with a two-level bootstrap interval.

    How seeds are pooled (issue "evidence that can decide"): the quantity is the *expected difference
    between one model trained by procedure A and one trained by procedure B*, so each seed is scored on
    its own and the per-seed paired differences are averaged (seed s of A is paired with seed s of B; both
    saw the same data order seed). Averaging the seeds' probabilities per patient instead would measure a
    seed ensemble, a model nobody deploys, and would hide the seed-to-seed spread. The interval resamples
    both sources of noise: every resample draws the N patients with replacement (the same draw for A, B
    and every seed, so the comparison stays paired) and, with more than one seed, S seeds with
    replacement. With R random masks per patient the metric is computed on the R·N pooled rows, as the
    robustness sweep does, and a drawn patient brings all R of its masked rows (a cluster bootstrap).

    With one seed and one mask this is :func:`meddiff.intervals.paired_difference`, draw for draw.

    Args:
        y_true: (N,) labels.
        probs_a, probs_b: predictions (S, R, N, K), or (S, N, K) / (N, K) (see :func:`seed_mask_stack`).

    Returns:
        ``value`` (mean over seeds), ``ci_low``, ``ci_high`` (percentile interval at ``confidence``),
        ``n_valid`` (resamples where every drawn seed's metric was defined) and ``n_seeds``.

    Raises:
        ValueError: the two prediction stacks differ in shape (not the same seeds, masks and patients).
    """
    y_true = np.asarray(y_true)
    a, b = seed_mask_stack(probs_a, len(y_true)), seed_mask_stack(probs_b, len(y_true))
    if a.shape != b.shape:
        raise ValueError(f"paired predictions must have the same seeds, masks and patients: {a.shape} vs {b.shape}")
    n_seeds, n_masks, n, n_classes = a.shape
    labels = np.tile(y_true, n_masks)
    a_rows, b_rows = a.reshape(n_seeds, n_masks * n, n_classes), b.reshape(n_seeds, n_masks * n, n_classes)
    mask_offsets = (np.arange(n_masks) * n)[:, None]  # (R, 1): row of patient p under mask r is r·N + p

    def difference(patients: np.ndarray, seeds: np.ndarray) -> float:
        rows = (mask_offsets + patients[None, :]).ravel()
        target = labels[rows]
        per_seed = {s: metric(target, a_rows[s, rows]) - metric(target, b_rows[s, rows]) for s in np.unique(seeds)}
        return float(np.mean([per_seed[s] for s in seeds]))

    rng = np.random.default_rng(seed)
    every_seed = np.arange(n_seeds)
    values = []
    for _ in range(n_resamples):
        patients = rng.integers(0, n, size=n)
        seeds = rng.integers(0, n_seeds, size=n_seeds) if n_seeds > 1 else every_seed
        value = difference(patients, seeds)
        if np.isfinite(value):
            values.append(value)
    point = difference(np.arange(n), every_seed)
    if not values:
        return {"value": point, "ci_low": math.nan, "ci_high": math.nan, "n_valid": 0, "n_seeds": n_seeds}
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return {"value": point, "ci_low": float(low), "ci_high": float(high), "n_valid": len(values),
            "n_seeds": n_seeds}


def seed_mean(y_true: np.ndarray, probs: np.ndarray, metric: Callable[[np.ndarray, np.ndarray], float]) -> float:
    """Mean over seeds of ``metric`` on each seed's pooled (R·N) rows of ``probs`` (S, R, N, K)."""
    stack = seed_mask_stack(probs, len(y_true))
    labels = np.tile(np.asarray(y_true), stack.shape[1])
    return float(np.mean([metric(labels, s.reshape(-1, s.shape[-1])) for s in stack]))


def suite_estimates(
    y: np.ndarray,
    probs: dict[str, dict[str, np.ndarray]],
    rare_class: int | None,
    n_bootstrap: int,
    seed: int,
) -> dict[str, Estimate]:
    """The suite's claims as paired differences on the same test patients, seeds pooled by
    :func:`seed_pooled_difference`.

    Args:
        y: (N,) test labels.
        probs: variant → condition → predictions (S, R, N, K) (or (S, N, K) / (N, K)), every variant with
            the same S seeds and the same R masks; conditions are :data:`NO_MASKING`, :data:`MASKED_60`,
            :data:`MASKED_80` (learned missing-modality token, as ``evaluate`` and deployment score) and
            :data:`MASKED_60_IMPUTED`. A variant or condition missing from the suite leaves its claim
            unmeasured, with the reason.
        rare_class: the rare class for the rare-subset claim (``None``: not measured).
    """
    n = len(y)

    def paired(a: str, b: str, condition: str, metric: Callable[[np.ndarray, np.ndarray], float], what: str,
               condition_b: str | None = None) -> Estimate:
        condition_b = condition_b or condition
        if condition not in probs.get(a, {}) or condition_b not in probs.get(b, {}):
            return Estimate.missing(
                f"not measured: the suite has no {a}@{condition} or {b or 'baseline'}@{condition_b}"
            )
        interval = seed_pooled_difference(y, probs[a][condition], probs[b][condition_b], metric, n_bootstrap, seed)
        n_seeds, n_masks = seed_mask_stack(probs[a][condition], n).shape[:2]
        how = f"{n_seeds} seed{'s' if n_seeds != 1 else ''}" + (f", {n_masks} masks per patient" if n_masks > 1 else "")
        return Estimate.from_interval(interval, n, f"{what}; {how}")

    def best(candidates: tuple[str, ...], condition: str, metric: Callable[[np.ndarray, np.ndarray], float]) -> str:
        present = [c for c in candidates if condition in probs.get(c, {})]
        return max(present, key=lambda c: seed_mean(y, probs[c][condition], metric)) if present else ""

    estimates: dict[str, Estimate] = {}
    unimodal = best(UNIMODAL, NO_MASKING, auc_macro)
    estimates["fusion_beats_unimodal"] = paired(
        "full", unimodal, NO_MASKING, auc_macro, f"best unimodal on test: {unimodal or 'none'}"
    )
    estimates["masking_keeps_accuracy_at_80"] = paired(
        "full", "no_masking", MASKED_80, auc_macro, "80 % of slots masked"
    )
    if rare_class is None:
        estimates["rare_gain_at_high_missingness"] = Estimate.missing("not measured: no rare class in the data")
    else:
        def rare_auc(t: np.ndarray, p: np.ndarray) -> float:
            return auc_one_vs_rest(t, p, rare_class)

        baseline = best(BASELINES, MASKED_80, rare_auc)
        estimates["rare_gain_at_high_missingness"] = paired(
            "full", baseline, MASKED_80, rare_auc, f"best baseline on the rare class: {baseline or 'none'}"
        )
    estimates["diffusion_imputation_helps"] = paired(
        "full", "full", MASKED_60_IMPUTED, auc_macro, "60 % of slots masked, with against without imputation",
        condition_b=MASKED_60,
    )
    for key, variant in PAIRED_AT_FULL_MASK.items():
        estimates[key] = paired("full", variant, NO_MASKING, auc_macro, f"full − {variant}")
    return estimates


#: Where the claims measured by other stages are read, relative to the reports folder (``paths.reports``);
#: ``suite/dvc.yaml`` lists the same files as dependencies.
GENERATE_LATENTS = "generate/latents.npz"
GENERATE_METRICS = "generate/metrics.json"
EXPLAIN_METRICS = "explain/metrics.json"
EVALUATE_METRICS = "evaluate/metrics.json"
EXTERNAL_METRICS = "external/metrics.json"
#: The explain score compared with the Dice claim: top-k voxels with k the lesion's size (no threshold to tune).
DICE_SCORE = "dice_topk"


def _absent(path: Path, stage: str) -> Estimate:
    return Estimate.missing(f"not measured: {path} is absent (run `meddiff {stage}` first)")


def _fid_estimate(reports: Path, n_bootstrap: int, seed: int) -> Estimate:
    """Fréchet distance of the synthetic latents to the real test latents (``generate``'s own feature
    space), with a percentile bootstrap interval that resamples both samples. A resample duplicates
    points, which inflates the distance: the interval can lie above the point, conservative for "< 30"."""
    latents_path, metrics_path = reports / GENERATE_LATENTS, reports / GENERATE_METRICS
    if not latents_path.is_file():
        if not metrics_path.is_file():
            return _absent(latents_path, "generate")
        value = float(json.loads(metrics_path.read_text())["frechet_distance"])
        return Estimate(value, math.nan, math.nan, 0, f"no interval: {latents_path} is absent")
    import torch
    from monai.metrics import FIDMetric

    with np.load(latents_path) as latents:
        synthetic, real = latents["synthetic"].astype(np.float64), latents["real_test"].astype(np.float64)

    def fid(a: np.ndarray, b: np.ndarray) -> float:
        return float(FIDMetric()(torch.from_numpy(a), torch.from_numpy(b)))

    rng = np.random.default_rng(seed)
    values = [
        fid(synthetic[rng.integers(0, len(synthetic), len(synthetic))], real[rng.integers(0, len(real), len(real))])
        for _ in range(n_bootstrap)
    ]
    finite = [v for v in values if math.isfinite(v)]
    low, high = np.quantile(finite, [0.025, 0.975]) if finite else (math.nan, math.nan)
    return Estimate(fid(synthetic, real), float(low), float(high), len(real),
                    f"fused latent z: {len(synthetic)} synthetic vs {len(real)} real test patients; "
                    "both samples resampled")


def _dice_estimate(reports: Path) -> Estimate:
    path = reports / EXPLAIN_METRICS
    if not path.is_file():
        return _absent(path, "explain")
    summary = json.loads(path.read_text())
    method = summary["method"]
    score = summary["localisation"][method]["all"][DICE_SCORE]
    return Estimate.from_interval(score, int(score.get("n", summary["n_patients"])),
                                  f"{method}, {DICE_SCORE} (k = lesion size), test patients with a lesion")


def _subgroup_estimate(reports: Path) -> Estimate:
    """The minority-site AUC gap of the trained model: on the external drop (``meddiff external``) when it has
    been scored, else on the internal test split (``evaluate``)."""
    external, internal = reports / EXTERNAL_METRICS, reports / EVALUATE_METRICS
    path, where = (external, "external drop") if external.is_file() else (internal, "internal test split")
    if not path.is_file():
        return _absent(internal, "evaluate")
    subgroup = json.loads(path.read_text())["subgroup"]
    if not subgroup.get("applicable"):
        return Estimate.missing(f"not measured ({where}): {subgroup.get('reason', 'no subgroup')}")
    return Estimate.from_interval(
        subgroup["auc_gap"], subgroup["n_subgroup"] + subgroup["n_rest"],
        f"{where}, site {subgroup['site']}: {subgroup['n_subgroup']} patients vs {subgroup['n_rest']} from other "
        "sites (the trained model of `make run`)",
    )


def stage_estimates(reports_dir: Path, n_bootstrap: int, seed: int) -> dict[str, Estimate]:
    """The claims measured by other stages, read from their reports under ``reports_dir``: FID
    (``generate``), attribution Dice (``explain``), the subgroup gap (``external``, else ``evaluate``). A
    report that does not exist leaves its claim inconclusive, saying which file is absent."""
    reports = Path(reports_dir)
    return {
        "fid_below_30": _fid_estimate(reports, n_bootstrap, seed),
        "attribution_dice_above_07": _dice_estimate(reports),
        "no_subgroup_left_behind": _subgroup_estimate(reports),
    }
