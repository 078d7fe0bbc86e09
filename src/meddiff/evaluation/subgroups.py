"""The rare disease and the underrepresented subgroup, reported separately (proposal §2, equity).

* Rare classes: one-vs-rest AUC and sensitivity (recall) with bootstrap intervals; by default the
  classes with at most 5 % of the training split.
* Subgroup: metrics inside the minority acquisition site and outside it, the AUC gap
  (rest − subgroup) with its own bootstrap interval, and the equalised-odds difference. Patients
  whose site is unknown (no ``managingOrganization``) belong to no site: they are counted, never
  compared. With fewer than two known sites, or an empty side, the comparison does not apply and
  the report says why instead of failing the stage.
"""

from __future__ import annotations

import numpy as np

from meddiff.data.dataset import ProcessedDataset
from meddiff.intervals import bootstrap_ci
from meddiff.metrics import auc_macro, auc_one_vs_rest, equalised_odds_difference, f1_macro

RARE_PREVALENCE = 0.05
#: The site of a patient whose export names none (``meddiff.data.ingest.manifest.UNKNOWN_SITE``).
UNKNOWN_SITE = "unknown"


def rare_classes(data: ProcessedDataset, names: list[str] | None) -> list[int]:
    if names:
        unknown = set(names) - set(data.class_names)
        if unknown:
            raise ValueError(f"evaluate.rare_classes names unknown classes {sorted(unknown)}")
        return [data.class_names.index(n) for n in names]
    return rare_by_prevalence(data.arrays["label"][data.indices("train")], data.n_classes)


def rare_by_prevalence(labels: np.ndarray, n_classes: int) -> list[int]:
    """The classes present in ``labels`` (N,) with a prevalence ≤ :data:`RARE_PREVALENCE`."""
    prevalence = np.bincount(labels, minlength=n_classes) / max(1, len(labels))
    return [c for c in range(n_classes) if 0 < prevalence[c] <= RARE_PREVALENCE]


def minority_site(data: ProcessedDataset, name: str | None) -> str | None:
    """The subgroup's site: ``name`` when given, else the least frequent known site; ``None`` when the
    data have fewer than two known sites (no subgroup to compare).

    Raises:
        ValueError: ``name`` is not a site of the data.
    """
    sites, counts = np.unique(data.arrays["site"], return_counts=True)
    if name:
        if name not in sites:
            raise ValueError(f"evaluate.subgroup_site {name!r} is not a site in the data ({sites.tolist()})")
        return name
    known = sites != UNKNOWN_SITE
    if known.sum() < 2:
        return None
    return str(sites[known][np.argmin(counts[known])])


def rare_report(y: np.ndarray, probs: np.ndarray, classes: list[int], names: list[str], n: int, seed: int) -> dict:
    report = {}
    for c in classes:
        def sensitivity(t: np.ndarray, p: np.ndarray, c: int = c) -> float:
            positives = t == c
            return float(np.mean(p[positives].argmax(axis=1) == c)) if positives.any() else float("nan")

        report[names[c]] = {
            "n_positive": int((y == c).sum()),
            "auc": bootstrap_ci(y, probs, lambda t, p, c=c: auc_one_vs_rest(t, p, c), n, seed),
            "sensitivity": bootstrap_ci(y, probs, sensitivity, n, seed),
        }
    return report


def subgroup_report(
    y: np.ndarray, probs: np.ndarray, sites: np.ndarray, site: str | None, n: int, seed: int
) -> dict:
    """Metrics inside ``site`` against every other known site, for the patients of ``sites`` (n,).

    Returns a report with ``applicable`` False and the ``reason`` when there is nothing to compare
    (no second known site, or an empty side), always with ``n_unknown_site``.
    """
    sites = np.asarray(sites)
    known = sites != UNKNOWN_SITE
    n_unknown = int((~known).sum())
    in_group = sites == site
    rest = known & ~in_group
    if site is None or not in_group.any() or not rest.any():
        reason = (
            "fewer than two known sites in the data" if site is None
            else f"no test patient {'from' if not in_group.any() else 'outside'} site {site!r}"
        )
        return {"applicable": False, "reason": reason, "site": site, "n_subgroup": int(in_group.sum()),
                "n_rest": int(rest.sum()), "n_unknown_site": n_unknown}
    y, probs, in_group = y[known], probs[known], in_group[known]

    def auc_gap_on(rows: np.ndarray) -> float:
        inside, outside = rows[in_group[rows]], rows[~in_group[rows]]
        if len(inside) < 2 or len(outside) < 2:
            return float("nan")
        return auc_macro(y[outside], probs[outside]) - auc_macro(y[inside], probs[inside])

    rng = np.random.default_rng(seed)
    gaps = []
    for _ in range(n):
        value = auc_gap_on(rng.integers(0, len(y), len(y)))
        if np.isfinite(value):
            gaps.append(value)
    all_rows = np.arange(len(y))
    point = auc_gap_on(all_rows)
    low, high = np.quantile(gaps, [0.025, 0.975]) if gaps else (float("nan"), float("nan"))
    inside, outside = in_group, ~in_group
    return {
        "applicable": True,
        "site": site,
        "n_subgroup": int(inside.sum()),
        "n_rest": int(outside.sum()),
        "n_unknown_site": n_unknown,
        "subgroup": {
            "auc_macro": bootstrap_ci(y[inside], probs[inside], auc_macro, n, seed),
            "f1_macro": f1_macro(y[inside], probs[inside]),
        },
        "rest": {
            "auc_macro": bootstrap_ci(y[outside], probs[outside], auc_macro, n, seed),
            "f1_macro": f1_macro(y[outside], probs[outside]),
        },
        "auc_gap": {"value": float(point), "ci_low": float(low), "ci_high": float(high)},
        "equalised_odds_difference": equalised_odds_difference(y, probs, inside),
    }
