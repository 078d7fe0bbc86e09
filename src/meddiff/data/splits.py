"""Patient-level stratified train/val/test splits.

Patients are stratified on ``label × site``. Within the concatenation of the (shuffled) strata, each
patient goes to the split whose running quota (``fraction · patients seen``) is most behind, a
largest-deficit apportionment that keeps every stratum — hence every class and every site — close to
the target fractions. Small cohorts can still leave a rare class or the minority site out of a split;
a repair step then swaps patients between splits (sizes unchanged), and :func:`assert_stratified`
checks the result.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from meddiff.data.dataset import SPLITS


def _apportion(n: int, fractions: np.ndarray, assigned: np.ndarray) -> list[int]:
    order = []
    for _ in range(n):
        seen = assigned.sum() + 1
        deficit = fractions * seen - assigned
        choice = int(np.argmax(deficit))
        assigned[choice] += 1
        order.append(choice)
    return order


def _coverage_gaps(frame: pd.DataFrame, split: np.ndarray, columns: list[str]) -> list[tuple[str, object, int]]:
    gaps = []
    for column in columns:
        for value in sorted(frame[column].unique(), key=str):
            members = frame[column].to_numpy() == value
            for index in range(len(SPLITS)):
                if members.sum() >= len(SPLITS) and not np.any(members & (split == index)):
                    gaps.append((column, value, index))
    return gaps


def stratified_split(
    frame: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int,
    strata: tuple[str, ...] = ("label", "site"),
) -> np.ndarray:
    """The split name of every row of ``frame`` (an array of ``train``/``val``/``test``)."""
    fractions = np.array([1.0 - val_fraction - test_fraction, val_fraction, test_fraction])
    rng = np.random.default_rng([seed, 0x5917])
    split = np.zeros(len(frame), dtype=int)
    assigned = np.zeros(3)
    keys = frame[list(strata)].astype(str).agg("|".join, axis=1).to_numpy()
    for key in sorted(set(keys)):
        members = np.flatnonzero(keys == key)
        members = members[rng.permutation(len(members))]
        split[members] = _apportion(len(members), fractions, assigned)

    # repair: a class or site with ≥ 3 patients missing from a split borrows a patient by swapping
    columns = list(strata)
    for _ in range(4 * len(frame)):
        gaps = _coverage_gaps(frame, split, columns)
        if not gaps:
            break
        column, value, missing = gaps[0]
        group = frame[column].to_numpy() == value
        donor_split = int(np.argmax([np.sum(group & (split == s)) for s in range(3)]))
        donors = np.flatnonzero(group & (split == donor_split))
        partners = np.flatnonzero(~group & (split == missing))
        swapped = False
        for donor in rng.permutation(donors):
            for partner in rng.permutation(partners):
                trial = split.copy()
                trial[donor], trial[partner] = missing, donor_split
                if len(_coverage_gaps(frame, trial, columns)) < len(gaps):
                    split, swapped = trial, True
                    break
            if swapped:
                break
        if not swapped:
            break
    return np.array(SPLITS, dtype=object)[split].astype(str)


def assert_stratified(frame: pd.DataFrame, split: np.ndarray, columns: tuple[str, ...] = ("label", "site")) -> None:
    """Every class and every site with at least three patients appears in every split."""
    for column in columns:
        for value in frame[column].unique():
            members = frame[column].to_numpy() == value
            if members.sum() < len(SPLITS):
                continue
            present = set(split[members].tolist())
            if present != set(SPLITS):
                raise AssertionError(
                    f"{column}={value!r} ({members.sum()} patients) is missing from splits "
                    f"{sorted(set(SPLITS) - present)}"
                )
