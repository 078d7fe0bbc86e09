"""Robustness to missing modalities (proposal §3.6, task 3).

Scenarios, each evaluated on the test split with and without diffusion imputation of the missing
latents:

* ``random``: for each masking rate r, exactly round(r·S) of the S present (patient, modality)
  slots are masked, uniformly at random, keeping at least one modality per patient; above what that
  allows (2/3 when everyone has all three) every maskable slot is masked and ``masked_fraction``
  says so. Repeated ``n_repeats`` times with different masks;
* ``absent_<modality>``: that modality removed from every patient that has another one;
* ``subset_<m1+m2…>``: each of the 7 non-empty subsets of the modalities: only those modalities are
  shown, to the patients who have at least one of them (``n_patients`` says how many).

A row that could not measure what its name says carries a ``note`` ("nothing to mask", "no patient
has these modalities") instead of silently repeating the unmasked numbers.

AUC intervals come from a cluster bootstrap over patients (all repeats of a patient together).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from meddiff import MODALITIES
from meddiff.data.dataset import ProcessedDataset
from meddiff.intervals import bootstrap_ci
from meddiff.metrics import accuracy, auc_macro, auc_one_vs_rest, f1_macro
from meddiff.training.masking import drop_modality, mask_exact_fraction

LOG = logging.getLogger(__name__)

#: (data, index, modality_present (N, 3) after masking, impute) -> probabilities (N, classes)
Predict = Callable[[ProcessedDataset, np.ndarray, np.ndarray, bool], np.ndarray]

FIELDS = (
    "model", "scenario", "imputation", "masking_rate", "masked_fraction", "auc_macro", "auc_ci_low",
    "auc_ci_high", "f1_macro", "accuracy", "rare_auc", "n_patients", "note",
)


@dataclass(frozen=True)
class Scenario:
    name: str
    rate: float
    masks: list[np.ndarray]  # one (N, 3) modality_present after masking per repeat
    #: (N,) the patients this scenario scores (a subset scenario drops those with none of its modalities)
    rows: np.ndarray | None = field(default=None)


def modality_subsets() -> list[tuple[str, ...]]:
    """The 7 non-empty subsets of :data:`meddiff.MODALITIES`, singles first."""
    return [combo for size in range(1, len(MODALITIES) + 1) for combo in itertools.combinations(MODALITIES, size)]


def build_scenarios(present: np.ndarray, rates: list[float], repeats: int, seed: int) -> list[Scenario]:
    present_t = torch.from_numpy(present.astype(bool))
    scenarios = []
    for rate_index, rate in enumerate(rates):
        generator = torch.Generator().manual_seed(seed + rate_index)
        masks = [mask_exact_fraction(present_t, rate, generator).numpy() for _ in range(repeats if rate else 1)]
        scenarios.append(Scenario("random", rate, masks))
    for m, name in enumerate(MODALITIES):
        scenarios.append(Scenario(f"absent_{name}", float("nan"), [drop_modality(present_t, m).numpy()]))
    for subset in modality_subsets():
        shown = present.astype(bool) & np.isin(np.array(MODALITIES), subset)[None, :]
        scenarios.append(Scenario(f"subset_{'+'.join(subset)}", float("nan"), [shown], rows=shown.any(axis=1)))
    return scenarios


def evaluate_scenario(
    predict: Predict,
    data: ProcessedDataset,
    index: np.ndarray,
    scenario: Scenario,
    impute: bool,
    rare_classes: list[int],
    n_bootstrap: int,
    seed: int,
) -> dict:
    rows = np.ones(len(index), bool) if scenario.rows is None else scenario.rows
    index, masks = index[rows], [mask[rows] for mask in scenario.masks]
    labels = data.arrays["label"][index]
    present = data.arrays["modality_present"][index].astype(bool)
    masked = float(np.mean([(present & ~mask).sum() / max(1, present.sum()) for mask in masks]))
    row = {
        "scenario": scenario.name,
        "imputation": impute,
        "masking_rate": scenario.rate if np.isfinite(scenario.rate) else round(masked, 4),
        "masked_fraction": round(masked, 4),
        "n_patients": len(index),
        "note": _note(scenario, present, masked),
    }
    if len(index) == 0:
        nan = float("nan")
        return {**row, "auc_macro": nan, "auc_ci_low": nan, "auc_ci_high": nan, "f1_macro": nan, "accuracy": nan,
                "rare_auc": nan}
    probs = [predict(data, index, mask, impute) for mask in masks]
    pooled_probs = np.concatenate(probs)
    pooled_labels = np.tile(labels, len(probs))
    clusters = np.tile(np.arange(len(index)), len(probs))
    auc = bootstrap_ci(pooled_labels, pooled_probs, auc_macro, n_bootstrap, seed, clusters=clusters)
    rare = [np.mean([auc_one_vs_rest(labels, p, c) for p in probs]) for c in rare_classes]
    return {
        **row,
        "auc_macro": auc["value"],
        "auc_ci_low": auc["ci_low"],
        "auc_ci_high": auc["ci_high"],
        "f1_macro": float(np.mean([f1_macro(labels, p) for p in probs])),
        "accuracy": float(np.mean([accuracy(labels, p) for p in probs])),
        "rare_auc": float(np.nanmean(rare)) if rare and np.isfinite(rare).any() else float("nan"),
    }


def _note(scenario: Scenario, present: np.ndarray, masked: float) -> str:
    """Why a row does not measure what its name says, or "" when it does."""
    if len(present) == 0:
        return "no test patient has any of these modalities"
    if scenario.name == "random" and scenario.rate > 0 and masked == 0.0:
        return "nothing to mask: no patient has two modalities (one is always kept)"
    if scenario.name.startswith("absent_") and masked == 0.0:
        return "nothing removed: no patient has this modality beside another one"
    if scenario.name.startswith("subset_"):
        shown = scenario.name.removeprefix("subset_").split("+")
        never = [m for m in shown if not present[:, MODALITIES.index(m)].any()]
        if never and len(never) < len(shown):
            rest = "+".join(m for m in shown if m not in never)
            return f"no test patient has {'+'.join(never)}: the same as subset_{rest}"
    return ""


def robustness_sweep(
    predict: Predict,
    data: ProcessedDataset,
    index: np.ndarray,
    rates: list[float],
    repeats: int,
    imputation: list[bool],
    rare_classes: list[int],
    n_bootstrap: int,
    seed: int,
    model_name: str = "meddiff",
) -> list[dict]:
    rows = []
    for scenario in build_scenarios(data.arrays["modality_present"][index], rates, repeats, seed):
        for impute in imputation:
            row = {"model": model_name, **evaluate_scenario(
                predict, data, index, scenario, impute, rare_classes, n_bootstrap, seed
            )}
            rows.append(row)
            LOG.info(
                "%s %s rate %.2f imputation %s: AUC %.3f [%.3f, %.3f]", model_name, scenario.name,
                row["masking_rate"], impute, row["auc_macro"], row["auc_ci_low"], row["auc_ci_high"],
            )
    return rows
