"""The subgroup report on drops of every shape: one site, unknown sites, an empty side."""

from __future__ import annotations

import numpy as np
import pytest

from meddiff.evaluation.subgroups import UNKNOWN_SITE, minority_site, subgroup_report
from meddiff.metrics import auc_macro


class Sites:
    """The part of a processed dataset that :func:`minority_site` reads."""

    def __init__(self, sites: list[str]) -> None:
        self.arrays = {"site": np.asarray(sites)}


def predictions(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    logits = rng.normal(size=(n, 2)) + np.eye(2)[y] * 1.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, probs


def test_single_site_is_not_applicable_and_nothing_fails() -> None:
    y, probs = predictions(40)
    sites = np.array(["site_a"] * 40)
    assert minority_site(Sites(list(sites)), None) is None
    report = subgroup_report(y, probs, sites, None, n=50, seed=0)
    assert report == {"applicable": False, "reason": "fewer than two known sites in the data", "site": None,
                      "n_subgroup": 0, "n_rest": 40, "n_unknown_site": 0}


def test_unknown_site_is_counted_never_compared() -> None:
    y, probs = predictions(60)
    sites = np.array(["site_a"] * 40 + ["site_b"] * 12 + [UNKNOWN_SITE] * 8)
    # the unknown patients outnumber no one: site_b (12) is the minority of the known sites
    assert minority_site(Sites(list(sites)), None) == "site_b"
    report = subgroup_report(y, probs, sites, "site_b", n=50, seed=0)
    assert report["applicable"] is True
    assert (report["n_subgroup"], report["n_rest"], report["n_unknown_site"]) == (12, 40, 8)
    rest = sites == "site_a"
    assert report["rest"]["auc_macro"]["value"] == pytest.approx(auc_macro(y[rest], probs[rest]))


def test_unknown_is_never_the_minority_and_one_known_site_is_not_applicable() -> None:
    sites = ["site_a"] * 30 + [UNKNOWN_SITE] * 2
    assert minority_site(Sites(sites), None) is None


def test_empty_side_in_the_test_split_is_reported() -> None:
    y, probs = predictions(20)
    sites = np.array(["site_a"] * 20)  # site_b exists in the data, but not among these test patients
    report = subgroup_report(y, probs, sites, "site_b", n=50, seed=0)
    assert report["applicable"] is False and report["reason"] == "no test patient from site 'site_b'"
