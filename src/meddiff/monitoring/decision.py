"""Drift of a new drop against the training reference, group by group, and whether to retrain.

The recurring pipeline retrains only for a reason (issue 13): a feature group in ``monitor.decide_on``
drifted (:mod:`.drift`), or enough newly labelled patients arrived (``monitor.min_new_labelled``).
Otherwise it records "no retrain" with the measured shares. The champion still moves only through the
promote gate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from meddiff.config import MonitorConfig
from meddiff.monitoring.drift import GroupDrift, group_drift
from meddiff.monitoring.features import GROUPS


@dataclass
class RetrainDecision:
    """``retrain`` and every reason for it (empty when there is none), with the evidence."""

    retrain: bool
    reasons: list[str]
    n_new_patients: int
    n_new_labelled: int
    groups: list[GroupDrift] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"retrain": self.retrain, "reasons": self.reasons, "n_new_patients": self.n_new_patients,
                "n_new_labelled": self.n_new_labelled, "groups": [g.to_dict() for g in self.groups]}


def assess_drift(
    reference: dict[str, pd.DataFrame], current: dict[str, pd.DataFrame], config: MonitorConfig,
    html_dir: Path | None = None,
) -> list[GroupDrift]:
    """Every group of :data:`GROUPS` present on both sides (:func:`.reference.feature_tables`), tested;
    evidently's pages go to ``html_dir/drift_<group>.html``."""
    results = []
    for name in GROUPS:
        if name in reference and name in current:
            html = html_dir / f"drift_{name}.html" if html_dir is not None else None
            results.append(group_drift(name, reference[name], current[name], config.drift_share, html))
    return results


def decide(
    groups: list[GroupDrift], n_new_patients: int, n_new_labelled: int, config: MonitorConfig,
) -> RetrainDecision:
    """Retrain when a group in ``config.decide_on`` drifted or ≥ ``min_new_labelled`` new patients are labelled."""
    reasons = [f"{g.group} drift: {g.drifted_share:.0%} of {len(g.columns)} features drifted "
               f"(threshold {g.drift_share:.0%})" for g in groups if g.drifted and g.group in config.decide_on]
    if n_new_labelled >= config.min_new_labelled:
        reasons.append(f"{n_new_labelled} newly labelled patients (threshold {config.min_new_labelled})")
    return RetrainDecision(bool(reasons), reasons, n_new_patients, n_new_labelled, groups)
