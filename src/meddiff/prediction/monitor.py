"""The ``monitor`` stage: has a new drop drifted from what the model was trained on, and should the
recurring run retrain? (issue 13, "Retraining that has a reason").

1. the model (``predict.model_uri``, default the registry's champion) with its preprocessing artefacts
   and the training patients' monitored statistics (``<model>/monitoring/``, written by ``train``);
2. the drop ingested and preprocessed in apply mode, exactly as :mod:`.predict` does (nothing refitted;
   malformed records quarantined with their reason);
3. per feature group (EHR, note, image, the encoders' latents) evidently's drift tests
   (:mod:`meddiff.monitoring.drift`), and the decision (:func:`meddiff.monitoring.decision.decide`).

Writes ``report_dir`` atomically: ``decision.json`` (retrain, reasons, per-group shares), ``drift.json``
(every feature's test), ``metrics.json`` (shares and counts, for KFP), ``drift_<group>.html`` (evidently's
pages) and ``index.html`` (the summary a person opens).
"""

from __future__ import annotations

import html
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from meddiff.config import Params
from meddiff.data.admit import admit_drop
from meddiff.data.dataset import UNKNOWN_LABEL
from meddiff.io import atomic_dir, atomic_file, write_json
from meddiff.model.multimodal import MedDiffModel
from meddiff.monitoring.decision import RetrainDecision, assess_drift, decide
from meddiff.monitoring.reference import MONITORING_DIR, feature_tables, load_reference
from meddiff.prediction.predict import model_uri, resolve_model_dir

LOG = logging.getLogger(__name__)

DECISION_FILE = "decision.json"


@dataclass
class MonitorResult:
    """Summary of ``meddiff monitor``; ``retrain`` is what the recurring pipeline branches on."""

    report_dir: str
    model_uri: str
    retrain: bool
    reasons: list[str] = field(default_factory=list)
    n_new_patients: int = 0
    n_new_labelled: int = 0
    drifted_share: dict[str, float] = field(default_factory=dict)
    quarantined: int = 0
    seconds: float = 0.0


def _index_page(decision: RetrainDecision, uri: str) -> str:
    verdict = "retrain" if decision.retrain else "no retrain"
    reasons = "".join(f"<li>{html.escape(r)}</li>" for r in decision.reasons) or "<li>no drift, too few new labels</li>"
    rows = "".join(
        f"<tr><td><a href='drift_{g.group}.html'>{g.group}</a></td><td>{g.n_reference}</td><td>{g.n_current}</td>"
        f"<td>{sum(c.drifted for c in g.columns)} / {len(g.columns)}</td><td>{g.drifted_share:.0%}</td>"
        f"<td>{'yes' if g.drifted else 'no'}</td><td>{html.escape(g.note or ', '.join(g.untestable))}</td></tr>"
        for g in decision.groups)
    return (f"<!doctype html><meta charset='utf-8'><title>meddiff drift report</title>"
            f"<h1>Drift of the new drop against the training data: {verdict}</h1>"
            f"<p>Model {html.escape(uri)}; {decision.n_new_patients} new patients, {decision.n_new_labelled} labelled."
            f"</p><ul>{reasons}</ul><table border=1 cellpadding=4><tr><th>group</th><th>reference</th><th>new</th>"
            f"<th>features drifted</th><th>share</th><th>drifted</th><th>note / untestable</th></tr>{rows}</table>"
            "<p>Per-feature tests (evidently): the group links; threshold in <code>params.yaml</code> monitor.</p>")


def run_monitor(params: Params, new_patients_dir: Path, report_dir: Path) -> MonitorResult:
    """Compare the raw drop ``new_patients_dir`` with the model's training reference; write ``report_dir``.

    Raises:
        FileNotFoundError: no drop, no model, or a model saved without its monitoring reference.
        ValueError: no patient of the drop could be admitted.
    """
    started = time.perf_counter()
    uri = model_uri(params)
    with tempfile.TemporaryDirectory(prefix="meddiff-monitor-") as scratch, atomic_dir(report_dir) as staging:
        work = Path(scratch)
        model_dir = resolve_model_dir(params, uri, work / "model")
        reference = load_reference(model_dir / MONITORING_DIR)
        # counts only: the rejected records themselves are predict's to report (one PHI-bearing ledger per drop)
        ingest, data = admit_drop(params, Path(new_patients_dir), model_dir, work, staging, keep_records=False)
        model = MedDiffModel.from_pretrained(model_dir)
        groups = assess_drift(reference.tables, feature_tables(data, model, reference.projection), params.monitor,
                              html_dir=staging)
        # new: labelled, and not one of the patients of the model's dataset (same pseudonym, same key)
        unseen = ~np.isin(data.arrays["patient_id"].astype(str), list(reference.patient_ids))
        n_labelled = int(((data.arrays["label"] != UNKNOWN_LABEL) & unseen).sum())
        decision = decide(groups, len(data), n_labelled, params.monitor)
        write_json(staging / DECISION_FILE, {"model_uri": uri, **{k: v for k, v in decision.to_dict().items()
                                                                    if k != "groups"},
                                             "drifted_share": {g.group: g.drifted_share for g in groups}})
        write_json(staging / "drift.json", {"model_uri": uri, "groups": [g.to_dict() for g in groups]})
        write_json(staging / "metrics.json", {
            "retrain": int(decision.retrain), "n_new_patients": len(data), "n_new_labelled": n_labelled,
            "quarantined": ingest.quarantined,
            "drifted_share": {g.group: round(g.drifted_share, 4) for g in groups},
        })
        with atomic_file(staging / "index.html") as handle:
            handle.write(_index_page(decision, uri))
    seconds = time.perf_counter() - started
    LOG.info("monitor: %s (%s) for %d new patients (%.1f s)", "retrain" if decision.retrain else "no retrain",
             "; ".join(decision.reasons) or "no reason", len(data), seconds)
    return MonitorResult(str(report_dir), uri, decision.retrain, decision.reasons, len(data), n_labelled,
                         {g.group: round(g.drifted_share, 4) for g in groups}, ingest.quarantined, round(seconds, 2))
