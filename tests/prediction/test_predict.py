"""``meddiff predict``: the raw files of the cohort's test patients, some modalities deleted, one patient
malformed, reproduce the evaluate stage's probabilities; outputs are valid FHIR R4 and match the registered
pyfunc on the same preprocessed input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from meddiff import MODALITIES
from meddiff.config import apply_overrides
from meddiff.data.dataset import load_processed
from meddiff.evaluation.evaluate import TEST_PROBABILITIES_FILE
from meddiff.model.calibration import calibrated, load_temperature, log_probabilities
from meddiff.model.inference import predict_proba
from meddiff.model.multimodal import MedDiffModel
from meddiff.prediction.predict import (
    PREDICTIONS_FILE,
    QUARANTINE_RECORDS_FILE,
    QUARANTINE_SUMMARY_FILE,
    RISK_ASSESSMENTS_FILE,
    run_predict,
)
from tests.trained_cohort import raw_ids_by_pseudonym, raw_subset

if TYPE_CHECKING:
    from tests.trained_cohort import Trained

#: predictions.csv keeps six decimals
CSV_TOLERANCE = 5e-7
#: evaluate's 6-decimal probabilities calibrated again: the rounding error passes through log and softmax
CALIBRATED_CSV_TOLERANCE = 5e-6


def _read_probabilities(path: Path, id_column: str) -> dict[str, np.ndarray]:
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    columns = [c for c in rows[0] if c.startswith("p_")]
    return {row[id_column]: np.array([float(row[c]) for c in columns]) for row in rows}


@pytest.fixture(scope="module")
def scenario(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Predict (local model folder) on the test patients' raw files: one without image, one without note,
    one without labs, one malformed."""
    data = load_processed(trained.processed)
    raw_of = raw_ids_by_pseudonym(trained)
    test = data.indices("test")
    present = data.arrays["modality_present"]
    chosen: dict[str, int] = {}
    for modality, column in (("image", 0), ("text", 1), ("tabular", 2)):  # a patient who keeps another modality
        chosen[modality] = next(i for i in test if present[i, column] and present[i].sum() >= 2
                                and i not in chosen.values())
    chosen["malformed"] = next(i for i in test if i not in chosen.values())
    name = {key: raw_of[str(data.arrays["patient_id"][i])] for key, i in chosen.items()}
    drop = raw_subset(trained.raw, tmp_path_factory.mktemp("drop") / "raw",
                      [raw_of[str(pid)] for pid in data.arrays["patient_id"][test]],
                      without_image={name["image"]}, without_note={name["text"]}, without_labs={name["tabular"]},
                      malformed={name["malformed"]})
    report = tmp_path_factory.mktemp("predict") / "predict"
    params = apply_overrides(trained.params, [f"predict.model_uri={trained.models}"])
    result = run_predict(params, drop, report)
    return {"data": data, "chosen": chosen, "report": report, "result": result, "drop": drop}


def test_predict_reproduces_the_evaluate_stage(trained: Trained, scenario: dict) -> None:
    data, chosen = scenario["data"], scenario["chosen"]
    predicted = _read_probabilities(scenario["report"] / PREDICTIONS_FILE, "patient_pseudonym")
    # evaluate scores the softmax outputs; predict shows them calibrated with the model's temperature
    temperature = load_temperature(trained.models)
    assert temperature is not None and json.loads((scenario["report"] / "metrics.json").read_text())[
        "temperature"] == temperature
    evaluated = {pid: calibrated(log_probabilities(p[None]), temperature)[0] for pid, p in
                 _read_probabilities(trained.evaluation / TEST_PROBABILITIES_FILE, "patient_id").items()}
    changed = {int(i) for i in chosen.values()}
    untouched = [i for i in data.indices("test") if i not in changed]
    assert len(untouched) >= 3
    for i in untouched:
        pid = str(data.arrays["patient_id"][i])
        assert np.abs(predicted[pid] - evaluated[pid]).max() <= CALIBRATED_CSV_TOLERANCE, pid
    # a deleted modality is an absent one: the evaluate stage's masked prediction for that patient
    model = MedDiffModel.from_pretrained(trained.models)
    for modality, column in (("image", 0), ("text", 1), ("tabular", 2)):
        i = chosen[modality]
        masked = data.arrays["modality_present"][[i]].copy()
        masked[0, column] = False
        expected = calibrated(log_probabilities(predict_proba(model, data, np.array([i]), masked)), temperature)[0]
        pid = str(data.arrays["patient_id"][i])
        assert np.abs(predicted[pid] - expected).max() <= CSV_TOLERANCE, modality
        assert np.abs(predicted[pid] - evaluated[pid]).max() > 1e-4, f"deleting the {modality} changed nothing"
    assert str(data.arrays["patient_id"][chosen["malformed"]]) not in predicted
    assert len(predicted) == len(data.indices("test")) - 1


def test_malformed_patient_is_quarantined_with_its_reason(scenario: dict) -> None:
    report, result = scenario["report"], scenario["result"]
    summary = json.loads((report / QUARANTINE_SUMMARY_FILE).read_text())
    assert summary["records_in"] == summary["accepted"] + summary["quarantined"]
    assert summary["quarantined_by_reason"].get("out_of_range", 0) >= 1
    entries = [json.loads(line) for line in (report / QUARANTINE_RECORDS_FILE).read_text().splitlines()]
    patients = [e for e in entries if e["kind"] == "patient" and e["reason"] == "out_of_range"]
    assert len(patients) == 1 and "birthDate" in patients[0]["message"]
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["n_patients"] == result.n_patients == sum(metrics["predicted_per_class"].values())
    assert metrics["quarantined"] == result.quarantined


def test_predictions_csv_and_risk_assessments_agree_and_validate(scenario: dict) -> None:
    from fhir.resources.R4B.riskassessment import RiskAssessment

    report, data = scenario["report"], scenario["data"]
    with open(report / PREDICTIONS_FILE) as handle:
        rows = {row["patient_pseudonym"]: row for row in csv.DictReader(handle)}
    lines = (report / RISK_ASSESSMENTS_FILE).read_text().splitlines()
    assert len(lines) == len(rows)
    for line in lines:
        resource = RiskAssessment.model_validate_json(line)  # FHIR R4 (R4B models: RiskAssessment is unchanged)
        pid = resource.subject.reference.removeprefix("Patient/")
        row = rows[pid]
        probabilities = {p.outcome.text: float(p.probabilityDecimal) for p in resource.prediction}
        assert list(probabilities) == data.class_names
        assert abs(sum(probabilities.values()) - 1.0) < 1e-5
        for name, value in probabilities.items():
            assert abs(value - float(row[f"p_{name}"])) <= 1e-6
        assert row["predicted_class"] == max(probabilities, key=probabilities.get)
    image_deleted = str(data.arrays["patient_id"][scenario["chosen"]["image"]])
    assert rows[image_deleted]["has_image"] == "0" and {rows[image_deleted][f"has_{m}"] for m in MODALITIES} != {"0"}


def test_registered_model_predicts_the_same(trained: Trained, scenario: dict, tmp_path: Path) -> None:
    """The registry path (``models:/…@champion``), the registered pyfunc and ``mlflow models predict`` give
    the same numbers on the same preprocessed input."""
    import mlflow

    from meddiff import tracking
    from meddiff.data.batches import MODEL_INPUTS, to_batch
    from meddiff.data.dataset import PREPROCESSING_DIR
    from meddiff.data.ingest import run_ingest
    from meddiff.data.preprocess import run_preprocess_apply

    params = trained.params
    tracking.setup_experiment(params.tracking)
    tracking.set_alias(params.tracking.registered_model, tracking.CHAMPION_ALIAS, trained.registered_version)
    run_predict(params, scenario["drop"], tmp_path / "predict")
    local = _read_probabilities(scenario["report"] / PREDICTIONS_FILE, "patient_pseudonym")
    registry = _read_probabilities(tmp_path / "predict" / PREDICTIONS_FILE, "patient_pseudonym")
    assert registry.keys() == local.keys()
    assert max(np.abs(registry[k] - local[k]).max() for k in local) == 0.0

    run_ingest(params, scenario["drop"], tmp_path / "interim", tmp_path / "q", tmp_path / "r", label_required=False)
    run_preprocess_apply(params, tmp_path / "interim", trained.models / PREPROCESSING_DIR, tmp_path / "processed")
    applied = load_processed(tmp_path / "processed")
    model_uri = f"models:/{params.tracking.registered_model}/{trained.registered_version}"
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    batch = to_batch(applied, np.arange(len(applied)))  # the dtypes of the logged input example (as promote does)
    inputs = {name: batch[name].numpy() for name in (*MODEL_INPUTS, "modality_present")}
    served = np.asarray(pyfunc.predict(inputs))
    for pid, row in zip(applied.arrays["patient_id"], served, strict=True):
        assert np.abs(row - local[str(pid)]).max() <= CSV_TOLERANCE

    # `mlflow models predict`, the command a serving team runs, on the same input (JSON tensors)
    (tmp_path / "input.json").write_text(json.dumps({"inputs": {k: v.tolist() for k, v in inputs.items()}}))
    command = [str(Path(sys.executable).with_name("mlflow")), "models", "predict", "-m", model_uri,
               "-i", str(tmp_path / "input.json"), "-t", "json", "-o", str(tmp_path / "output.json"),
               "--env-manager", "local"]
    environment = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri(params.tracking)}
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    cli = np.asarray(json.loads((tmp_path / "output.json").read_text())["predictions"])
    np.testing.assert_array_equal(cli, served)


def test_a_missing_registered_model_is_a_user_error(trained: Trained, scenario: dict, tmp_path: Path) -> None:
    from meddiff.errors import UserError

    missing = f"models:/{trained.params.tracking.registered_model}/999"
    params = apply_overrides(trained.params, [f"predict.model_uri={missing}"])
    with pytest.raises(UserError, match="train and promote a model first"):
        run_predict(params, scenario["drop"], tmp_path / "predict")
    assert not (tmp_path / "predict").exists()
