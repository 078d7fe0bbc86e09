"""Per-column drift of one feature group with `evidently` (0.7, ``DataDriftPreset``).

Evidently chooses each column's test from its type and size (numerical, ≤ 1000 reference rows:
two-sample Kolmogorov-Smirnov, drift when p < 0.05; larger: Wasserstein distance in reference standard
deviations, drift when ≥ 0.1; categorical: chi-square or Jensen-Shannon) and calls the group drifted
when the share of drifted columns reaches ``drift_share``. Columns without any value on one side cannot
be tested and are reported as ``untestable`` (a feature that stopped being recorded is a change worth
seeing, but not a statistic).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

#: evidently's result status of a failed ("drift detected") test
_DRIFT_DETECTED = "FAIL"


def _infer_dtype_from_object(dtype: object) -> type:
    """The scalar type of ``dtype`` (``numpy.int64`` for ``"int64"``): what pandas < 3's
    ``pandas.core.dtypes.common.infer_dtype_from_object`` returned for a dtype, via its public successor
    ``pandas.api.types.pandas_dtype``."""
    from pandas.api.types import pandas_dtype

    return pandas_dtype(dtype).type


def _import_evidently() -> Any:
    """``evidently`` with its one pandas-3 incompatibility bridged.

    evidently 0.7.23 imports ``pandas.core.dtypes.common.infer_dtype_from_object`` at import time, which
    pandas 3 removed (only evidently's legacy column-type test calls it); the name is bound to the
    equivalent :func:`_infer_dtype_from_object` before the import.
    """
    import pandas.core.dtypes.common as dtypes_common

    if not hasattr(dtypes_common, "infer_dtype_from_object"):
        dtypes_common.infer_dtype_from_object = _infer_dtype_from_object  # type: ignore[attr-defined]
    return importlib.import_module("evidently")


@dataclass
class ColumnDrift:
    """One column's test: evidently's method, score (a p-value or a distance), threshold and verdict."""

    column: str
    method: str
    score: float
    threshold: float
    drifted: bool


@dataclass
class GroupDrift:
    """The drift of one feature group between reference and current patients."""

    group: str
    n_reference: int
    n_current: int
    columns: list[ColumnDrift] = field(default_factory=list)
    untestable: list[str] = field(default_factory=list)
    drift_share: float = 0.5
    #: why no test ran (an empty side), else ""
    note: str = ""

    @property
    def drifted_share(self) -> float:
        """Share of tested columns with drift; 0 when nothing was tested."""
        return sum(c.drifted for c in self.columns) / len(self.columns) if self.columns else 0.0

    @property
    def drifted(self) -> bool:
        return bool(self.columns) and self.drifted_share >= self.drift_share

    def to_dict(self) -> dict[str, Any]:
        return {
            "group": self.group, "n_reference": self.n_reference, "n_current": self.n_current,
            "drift_share_threshold": self.drift_share, "drifted_share": round(self.drifted_share, 4),
            "drifted": self.drifted, "note": self.note, "untestable": self.untestable,
            "columns": [vars(c) for c in self.columns],
        }


#: fewest patients on either side for a group to be tested at all
MIN_PATIENTS = 5


def group_drift(
    group: str, reference: pd.DataFrame, current: pd.DataFrame, drift_share: float, html_path: Path | None = None,
) -> GroupDrift:
    """Test every column of ``current`` against ``reference`` (same columns, one row per patient).

    Args:
        group: the feature group's name (reported).
        reference, current: per-patient feature tables; NaN = missing.
        drift_share: the group is drifted when at least this share of its tested columns drift.
        html_path: where evidently's interactive report is saved (skipped when nothing is tested).

    Raises:
        ValueError: the two tables have different columns.
    """
    if list(reference.columns) != list(current.columns):
        raise ValueError(f"{group}: reference columns {list(reference.columns)} != current {list(current.columns)}")
    result = GroupDrift(group, len(reference), len(current), drift_share=drift_share)
    if min(len(reference), len(current)) < MIN_PATIENTS:
        result.note = f"fewer than {MIN_PATIENTS} patients on one side: not tested"
        return result
    testable = [c for c in reference.columns if reference[c].notna().any() and current[c].notna().any()]
    result.untestable = [c for c in reference.columns if c not in testable]
    if not testable:
        result.note = "no column has values on both sides"
        return result
    evidently = _import_evidently()
    from evidently.presets import DataDriftPreset

    report = evidently.Report([DataDriftPreset(columns=testable, drift_share=drift_share)], include_tests=True)
    snapshot = report.run(current_data=current[testable], reference_data=reference[testable])
    payload = snapshot.dict()
    scores = {m["config"]["column"]: float(m["value"]) for m in payload["metrics"]
              if m["config"].get("type", "").endswith(":ValueDrift")}
    for test in payload["tests"]:
        config = test["metric_config"]["params"]
        if not config.get("type", "").endswith(":ValueDrift"):
            continue
        column = config["column"]
        result.columns.append(ColumnDrift(column, str(config["method"]), scores[column], float(config["threshold"]),
                                          test["status"] == _DRIFT_DETECTED))
    if html_path is not None:
        snapshot.save_html(str(html_path))
    return result
