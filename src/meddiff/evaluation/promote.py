"""The ``promote`` stage, the registry gate: the evaluated version becomes ``champion`` only when it
beats the current one.

Both models are scored on the same test split: the candidate's macro AUC comes from the ``evaluate``
stage's ``metrics.json``; the current champion is loaded from the registry (its pyfunc) and predicts on
the same patients. If it cannot score this data (e.g. a different vocabulary size), the AUC recorded
on its version at its own promotion is used instead, and the decision says so. Every decision is
written as model-version tags and to ``reports/promote/decision.json``.

The stage also writes the version's model card (:mod:`meddiff.evaluation.model_card`) to
``reports/promote/model_card.md`` and, for a registered version, logs it with the model (an artifact of the
version's logged model, ``models:/<model id>/model_card.md``, named by the version tag ``meddiff.model_card``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from meddiff import tracking
from meddiff.config import Params
from meddiff.data.dataset import ProcessedDataset, has_processed, load_processed, processed_digest
from meddiff.evaluation import model_card
from meddiff.io import read_json, write_json
from meddiff.metrics import auc_macro
from meddiff.model.inference import predict_proba
from meddiff.model.multimodal import RUN_FILE, MedDiffModel

LOG = logging.getLogger(__name__)
AUC_TAG = "meddiff.test_auc_macro"
DECISION_FILE = "decision.json"
#: Model-version tag: where the version's model card was logged.
MODEL_CARD_TAG = "meddiff.model_card"
#: Training-run tags the model card reports (provenance and the data the model was trained on).
DATA_VERSION_TAG, DATA_MD5_TAG = "meddiff.data_version", "meddiff.data_md5"
PROVENANCE_TAGS = ("meddiff.git_commit", "meddiff.params_hash")
CARD_RUN_TAGS = (*PROVENANCE_TAGS, DATA_VERSION_TAG, DATA_MD5_TAG)
#: The environment variable the pipeline shells set to the data version (recorded as DATA_VERSION_TAG).
DATA_VERSION_ENV = next(env for env, tag in tracking.ENVIRONMENT_TAGS.items() if tag == DATA_VERSION_TAG)


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
    """The champion's test macro AUC computed exactly as ``evaluate`` scores the candidate: its logged model
    folder through :func:`predict_proba` (softmax outputs; the served pyfunc adds the temperature)."""
    import mlflow

    folder = mlflow.pyfunc.load_model(model_uri).unwrap_python_model().model_dir
    probabilities = predict_proba(MedDiffModel.from_pretrained(folder), data, index)
    return auc_macro(data.arrays["label"][index], probabilities)


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
    params: Params, processed_dir: Path, model_dir: Path, evaluation_dir: Path, explanation_dir: Path,
    data_card_dir: Path, report_dir: Path,
) -> GateDecision:
    """Decide whether the model in ``model_dir`` becomes ``champion``; write ``report_dir/decision.json``
    and the model card (``explanation_dir``: the explain stage's report, ``data_card_dir``: preprocess's).

    Raises:
        FileNotFoundError: ``evaluation_dir`` has no ``metrics.json``.
        RuntimeError: the champion can neither be rescored nor has a recorded AUC (see
            :func:`champion_gate`).
    """
    candidate_auc = _candidate_auc(evaluation_dir)
    run_file = Path(model_dir) / RUN_FILE
    version = str(read_json(run_file).get("registered_version") or "") if run_file.is_file() else ""
    name = params.tracking.registered_model
    data: ProcessedDataset | None = None
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
    registered = bool(version) and params.promote.enabled
    run = read_json(run_file) if run_file.is_file() else {}
    tags = _training_run_tags(params, run.get("mlflow_run_id")) if registered else {}
    card = write_card(params, processed_dir, model_dir, evaluation_dir, explanation_dir, data_card_dir, report_dir,
                      decision, tags, data)
    if registered:
        log_model_card(name, version, card)
    return decision


def _training_run_tags(params: Params, run_id: str | None) -> dict[str, str]:
    """The card's tags (:data:`CARD_RUN_TAGS`) of the training run, from the tracking store."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if not run_id:
        return {}
    tracking.setup_experiment(params.tracking)
    try:
        recorded = MlflowClient().get_run(run_id).data.tags
    except MlflowException as error:
        LOG.warning("model card: training run %s not readable (%s); its provenance is reported as not measured",
                    run_id, error)
        return {}
    return {tag: recorded[tag] for tag in CARD_RUN_TAGS if tag in recorded}


def write_card(
    params: Params, processed_dir: Path, model_dir: Path, evaluation_dir: Path, explanation_dir: Path,
    data_card_dir: Path, report_dir: Path, decision: GateDecision, run_tags: dict[str, str],
    data: ProcessedDataset | None = None,
) -> Path:
    """Fill the model card from this run's outputs and write ``report_dir/model_card.md``.

    The counts come from the preprocess data card (``data_card_dir/data_card.json``) when it exists, else from
    the processed data; explanation scores from ``explanation_dir/metrics.json``; a missing file makes its
    section say ``not measured``.
    """
    data_card_file = Path(data_card_dir) / "data_card.json"
    summary = model_card.read_optional_json(data_card_file)
    source = str(data_card_file)
    processed = Path(processed_dir)
    has_arrays = has_processed(processed)
    if summary is None and has_arrays:
        summary, source = model_card.data_summary(data or load_processed(processed)), "the processed data"
    metrics_file = Path(evaluation_dir) / "metrics.json"
    metrics = model_card.read_optional_json(metrics_file)
    run_file = Path(model_dir) / RUN_FILE
    inputs = model_card.CardInputs(
        model_name=decision.model,
        model_version=decision.candidate_version or None,
        classes=list((metrics or {}).get("class_names") or (summary or {}).get("classes") or []),
        modalities=list(params.train.modalities),
        data_summary=summary,
        data_summary_source=source if summary is not None else None,
        data_version=run_tags.get(DATA_VERSION_TAG) or os.environ.get(DATA_VERSION_ENV),
        data_md5=run_tags.get(DATA_MD5_TAG) or (processed_digest(processed) if has_arrays else None),
        training=read_json(run_file) if run_file.is_file() else None,
        metrics=metrics,
        robustness=model_card.read_robustness(Path(evaluation_dir) / "robustness.csv"),
        explanation=model_card.read_optional_json(Path(explanation_dir) / "metrics.json"),
        decision=decision.to_dict(),
        provenance={k: v for k, v in run_tags.items() if k in PROVENANCE_TAGS},
    )
    return model_card.write_model_card(Path(report_dir), inputs)


def log_model_card(name: str, version: str, card: Path) -> str:
    """Log ``card`` with registered version ``version`` of ``name``: into its logged model's artifacts (MLflow 3)
    or, for a version without one, its run's; tag the version with the location (:data:`MODEL_CARD_TAG`).

    Returns:
        The card's artifact URI.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    model_version = client.get_model_version(name, version)
    model_id = getattr(model_version, "model_id", None)
    if model_id:
        client.log_model_artifact(model_id, str(card))
        location = f"models:/{model_id}/{card.name}"
    else:
        client.log_artifact(model_version.run_id, str(card))
        location = f"runs:/{model_version.run_id}/{card.name}"
    client.set_model_version_tag(name, version, MODEL_CARD_TAG, location)
    LOG.info("model card of %s v%s logged: %s", name, version, location)
    return location
