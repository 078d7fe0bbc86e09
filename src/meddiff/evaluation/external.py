"""The ``external`` stage: a trained model scored on an independent, labelled drop (issue 11; TRIPOD+AI
external validation, CLAIM item 32).

1. admit the raw drop in *apply* mode (:func:`meddiff.data.admit.admit_drop` with ``label_required=True``):
   ingest and validate it as in training (a malformed record, or a patient without a diagnosis, is
   quarantined with its reason), then preprocess it with the preprocessing artefacts saved with the model
   (``<model>/preprocessing/``: tokenizer, tabular scaler statistics, image parameters). Nothing is fitted
   on the drop;
2. score every admitted patient exactly as ``evaluate`` scores the internal test split
   (:func:`meddiff.evaluation.evaluate.score_patients`): AUC-ROC, F1, accuracy, ECE with bootstrap
   intervals, the rare-class and minority-site reports, the robustness sweep (0-80 % random masking, each
   modality absent, all 7 non-empty modality subsets).

The rare classes are ``evaluate.rare_classes`` or, when null, those with a prevalence ≤ 5 % in the drop.
The built-in cohort writes such a drop with ``meddiff external_drop`` (``drops.external``: another seed,
2,000 patients by default, so ≥ 60 have the rare disease and ≥ 200 come from the minority site).

Writes ``external_processed_dir`` (``interim/``, ``quarantine/``, ``processed/``: the admitted drop, which
``meddiff suite`` scores its variants on) and ``report_dir`` (``metrics.json`` as ``evaluate`` writes it
plus ``admission`` counts, ``test_probabilities.csv``, ``robustness.csv``, ``robustness.png``,
``ingest/validation.json``). Both atomically. Logged to MLflow as the child run ``external`` of the model's
training run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from meddiff.config import Params
from meddiff.data.admit import admit_drop
from meddiff.evaluation import subgroups
from meddiff.evaluation.evaluate import score_patients, write_scores
from meddiff.io import atomic_dir, read_json
from meddiff.model.multimodal import MedDiffModel

LOG = logging.getLogger(__name__)



@dataclass
class ExternalResult:
    report_dir: str
    n_patients: int
    records_in: int
    quarantined: int
    auc_macro: float
    auc_ci: tuple[float, float]
    n_per_class: dict[str, int] = field(default_factory=dict)
    n_minority_site: int = 0
    seconds: float = 0.0


def external_rare_classes(params: Params, labels: np.ndarray, class_names: list[str]) -> list[int]:
    """``evaluate.rare_classes`` by name, else the classes with a prevalence ≤ 5 % in ``labels`` (N,).

    Raises:
        ValueError: ``evaluate.rare_classes`` names a class the model does not know.
    """
    names = params.evaluate.rare_classes
    if names:
        unknown = set(names) - set(class_names)
        if unknown:
            raise ValueError(f"evaluate.rare_classes names unknown classes {sorted(unknown)}")
        return [class_names.index(n) for n in names]
    return subgroups.rare_by_prevalence(labels, len(class_names))


def run_external(
    params: Params, external_dir: Path, model_dir: Path, external_processed_dir: Path, report_dir: Path
) -> ExternalResult:
    """Score the model in ``model_dir`` on the labelled raw drop ``external_dir`` (a folder or ``s3://`` prefix).

    Raises:
        FileNotFoundError: no drop, or the model has no preprocessing artefacts.
        ValueError: no patient of the drop could be admitted, or its labels are outside the model's classes.
    """
    started = time.perf_counter()
    with atomic_dir(external_processed_dir) as work, atomic_dir(report_dir) as staging:
        ingest, data = admit_drop(params, Path(external_dir), Path(model_dir), work, staging, keep_records=False,
                                  label_required=True)
        index = np.arange(len(data))
        labels = data.arrays["label"]
        rare = external_rare_classes(params, labels, data.class_names)
        model = MedDiffModel.from_pretrained(model_dir)
        metrics, probs = score_patients(params, data, index, model, rare=rare)
        validation = read_json(staging / "ingest" / "validation.json")
        metrics["admission"] = {
            "drop": str(external_dir), "records_in": ingest.records_in, "accepted": ingest.accepted,
            "quarantined": ingest.quarantined, "quarantined_by_reason": ingest.quarantined_by_reason,
            "n_patients": len(index), "by_kind": validation["by_kind"],
            "preprocessing": "apply mode: the model's saved tokenizer, scaler statistics and image parameters",
        }
        n_per_class = {name: int((labels == c).sum()) for c, name in enumerate(data.class_names)}
        metrics["n_per_class"] = n_per_class
        write_scores(params, metrics, data, index, probs, Path(model_dir), staging, "external")
    subgroup = metrics["subgroup"]
    seconds = round(time.perf_counter() - started, 2)
    test = metrics["test"]
    LOG.info("external: %d patients (%s), macro AUC %.3f [%.3f, %.3f] (%.1f s)", len(index), n_per_class,
             test["auc_macro"]["value"], test["auc_macro"]["ci_low"], test["auc_macro"]["ci_high"], seconds)
    return ExternalResult(
        report_dir=str(report_dir), n_patients=len(index), records_in=ingest.records_in,
        quarantined=ingest.quarantined, auc_macro=test["auc_macro"]["value"],
        auc_ci=(test["auc_macro"]["ci_low"], test["auc_macro"]["ci_high"]), n_per_class=n_per_class,
        n_minority_site=int(subgroup.get("n_subgroup", 0)) if subgroup.get("applicable") else 0, seconds=seconds,
    )
