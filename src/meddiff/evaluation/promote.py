"""The ``promote`` stage, the registry gate: the evaluated version becomes ``champion`` only when it
beats the current one.

Both models are scored on the same test split: the candidate's macro AUC comes from the ``evaluate``
stage's ``metrics.json``; the current champion is loaded from the registry (its pyfunc) and predicts on
the same patients. If it cannot score this data (e.g. a different vocabulary size), the AUC recorded
on its version at its own promotion is used instead, and the decision says so. Every decision is
written as model-version tags and to ``reports/promote/decision.json``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from meddiff import tracking
from meddiff.config import Params
from meddiff.data.batches import MODEL_INPUTS, to_batch
from meddiff.data.dataset import ProcessedDataset, load_processed
from meddiff.io import read_json, write_json
from meddiff.metrics import auc_macro
from meddiff.model.multimodal import RUN_FILE

LOG = logging.getLogger(__name__)
AUC_TAG = "meddiff.test_auc_macro"
DECISION_FILE = "decision.json"


@dataclass
class GateDecision:
    model: str
    candidate_version: str
    candidate_auc: float
    champion_version_before: str | None
    champion_auc: float | None
    champion_auc_source: str | None  # "rescored on this test split" or "recorded tag"
    promoted: bool
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def _champion_auc_on(model_uri: str, data: ProcessedDataset, index: np.ndarray) -> float:
    import mlflow

    pyfunc = mlflow.pyfunc.load_model(model_uri)
    batch = to_batch(data, index)
    inputs = {k: batch[k].numpy() for k in MODEL_INPUTS}
    inputs["modality_present"] = batch["modality_present"].numpy()
    return auc_macro(data.arrays["label"][index], np.asarray(pyfunc.predict(inputs)))


def champion_gate(
    params: Params, candidate_version: str, candidate_auc: float, data: ProcessedDataset, index: np.ndarray
) -> GateDecision:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    tracking.setup_experiment(params.tracking)
    client = MlflowClient()
    name = params.tracking.registered_model
    client.set_model_version_tag(name, candidate_version, AUC_TAG, f"{candidate_auc:.6f}")
    try:
        champion = client.get_model_version_by_alias(name, tracking.CHAMPION_ALIAS)
    except MlflowException:
        champion = None
    if champion is None:
        decision = GateDecision(name, candidate_version, candidate_auc, None, None, None, True, "no champion yet")
    elif str(champion.version) == str(candidate_version):
        decision = GateDecision(
            name, candidate_version, candidate_auc, str(champion.version), candidate_auc,
            "rescored on this test split", False, "the candidate already is the champion",
        )
    else:
        source = "rescored on this test split"
        try:
            champion_auc = _champion_auc_on(f"models:/{name}/{champion.version}", data, index)
        except (MlflowException, KeyError, RuntimeError, ValueError) as error:
            recorded = champion.tags.get(AUC_TAG)
            if recorded is None:
                raise RuntimeError(
                    f"champion {name} v{champion.version} can neither score this test split ({error}) nor has "
                    f"a recorded {AUC_TAG} tag; decide by hand: `mlflow` alias {tracking.CHAMPION_ALIAS}"
                ) from error
            champion_auc, source = float(recorded), f"recorded tag (rescoring failed: {error})"
        promoted = candidate_auc > champion_auc
        decision = GateDecision(
            name, candidate_version, candidate_auc, str(champion.version), champion_auc, source, promoted,
            f"candidate AUC {candidate_auc:.4f} {'>' if promoted else '<='} champion AUC {champion_auc:.4f}",
        )
    if decision.promoted:
        tracking.set_alias(name, tracking.CHAMPION_ALIAS, candidate_version)
    client.set_model_version_tag(name, candidate_version, "meddiff.gate", decision.reason)
    LOG.info("registry gate: %s (promoted: %s)", decision.reason, decision.promoted)
    return decision


def _candidate_auc(evaluation_dir: Path) -> float:
    metrics_file = Path(evaluation_dir) / "metrics.json"
    if not metrics_file.is_file():
        raise FileNotFoundError(f"{metrics_file}: run the evaluate stage first (promote reads its test AUC)")
    try:
        return float(read_json(metrics_file)["test"]["auc_macro"]["value"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{metrics_file}: no test.auc_macro.value ({error!r})") from None


def run_promote(
    params: Params, processed_dir: Path, model_dir: Path, evaluation_dir: Path, report_dir: Path
) -> GateDecision:
    """Decide whether the model in ``model_dir`` becomes ``champion``; write ``report_dir/decision.json``.

    Raises:
        FileNotFoundError: ``evaluation_dir`` has no ``metrics.json``.
        RuntimeError: the champion can neither be rescored nor has a recorded AUC (see
            :func:`champion_gate`).
    """
    candidate_auc = _candidate_auc(evaluation_dir)
    run_file = Path(model_dir) / RUN_FILE
    version = str(read_json(run_file).get("registered_version") or "") if run_file.is_file() else ""
    name = params.tracking.registered_model
    if not params.promote.enabled:
        decision = GateDecision(name, version, candidate_auc, None, None, None, False, "promote.enabled is false")
    elif not version:
        decision = GateDecision(
            name, version, candidate_auc, None, None, None, False, f"{run_file}: the model has no registered version"
        )
    else:
        data = load_processed(processed_dir)
        decision = champion_gate(params, version, candidate_auc, data, data.indices("test"))
    write_json(Path(report_dir) / DECISION_FILE, decision.to_dict())
    return decision
