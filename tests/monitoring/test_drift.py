"""evidently drift per feature group: no drift on the same distribution, drift on a shifted one."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from meddiff.monitoring.drift import MIN_PATIENTS, group_drift


def _table(rng: np.random.Generator, n: int, shift: float = 0.0) -> pd.DataFrame:
    return pd.DataFrame({"crp": rng.normal(10 + shift * 5, 5, n), "wbc": rng.normal(8 + shift * 2, 2, n),
                         "glucose": rng.normal(6, 1, n)})


def test_same_distribution_is_not_drift() -> None:
    rng = np.random.default_rng(1)
    result = group_drift("ehr", _table(rng, 300), _table(rng, 80), drift_share=0.5)
    assert [c.column for c in result.columns] == ["crp", "wbc", "glucose"]
    assert not result.drifted
    assert all(c.method == "K-S p_value" and c.threshold == 0.05 for c in result.columns)


def test_a_shifted_site_drifts_the_shifted_features_only(tmp_path) -> None:
    rng = np.random.default_rng(2)
    html = tmp_path / "drift_ehr.html"
    result = group_drift("ehr", _table(rng, 300), _table(rng, 80, shift=1.0), drift_share=0.5, html_path=html)
    drifted = {c.column for c in result.columns if c.drifted}
    assert drifted == {"crp", "wbc"}
    assert result.drifted_share == pytest.approx(2 / 3) and result.drifted
    assert html.is_file() and html.stat().st_size > 10_000


def test_a_feature_without_values_on_one_side_is_untestable_not_drift() -> None:
    rng = np.random.default_rng(3)
    reference, current = _table(rng, 100), _table(rng, 40)
    current["glucose"] = np.nan
    result = group_drift("ehr", reference, current, drift_share=0.5)
    assert result.untestable == ["glucose"]
    assert [c.column for c in result.columns] == ["crp", "wbc"]


def test_too_few_patients_are_reported_not_tested() -> None:
    rng = np.random.default_rng(4)
    result = group_drift("note", _table(rng, 100), _table(rng, MIN_PATIENTS - 1), drift_share=0.5)
    assert result.columns == [] and not result.drifted and "not tested" in result.note


def test_mismatching_columns_are_an_error() -> None:
    rng = np.random.default_rng(5)
    with pytest.raises(ValueError, match="reference columns"):
        group_drift("ehr", _table(rng, 20), _table(rng, 20).drop(columns="crp"), drift_share=0.5)


def test_the_pandas_3_bridge_returns_the_scalar_type_pandas_2_did() -> None:
    from meddiff.monitoring.drift import _infer_dtype_from_object

    assert _infer_dtype_from_object("int64") is np.int64
    assert _infer_dtype_from_object(float) is np.float64
    assert _infer_dtype_from_object("datetime64[ns]") is np.datetime64
