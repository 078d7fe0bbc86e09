"""The registry gate: the evaluated version becomes ``champion`` only when it beats the current one.

Both models are scored on the same test split: the current champion is loaded from the registry
(its pyfunc) and predicts on today's data. If it cannot score this data (e.g. a different
vocabulary size), the AUC recorded on its version at its own evaluation is used instead, and the
decision says so. Every decision is written as version tags and into the evaluation report.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np

from meddiff import tracking
from meddiff.config import Params
from meddiff.data.dataset import ProcessedDataset
from meddiff.evaluation.metrics import auc_macro
from meddiff.training.batches import MODEL_INPUTS, to_batch

LOG = logging.getLogger(__name__)
AUC_TAG = "meddiff.test_auc_macro"


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
    inputs["modality_present"] = batch["present"].numpy()
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
