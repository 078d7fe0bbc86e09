"""``meddiff external``: the raw files of the cohort's own test patients, admitted in apply mode, reproduce
the evaluate stage's test probabilities and metrics; a patient without a diagnosis is quarantined, not scored."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from meddiff.data.admit import PROCESSED_SUBDIR
from meddiff.data.dataset import load_processed
from meddiff.evaluation.evaluate import TEST_PROBABILITIES_FILE
from meddiff.evaluation.external import external_rare_classes, run_external
from meddiff.evaluation.robustness import modality_subsets
from tests.trained_cohort import pseudonymizer, raw_ids_by_pseudonym, raw_subset

if TYPE_CHECKING:
    from tests.trained_cohort import Trained

#: test_probabilities.csv keeps full float precision (repr)
EXACT = 1e-12


def _probabilities(path: Path) -> dict[str, np.ndarray]:
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    return {row["patient_id"]: np.array([float(v) for k, v in row.items() if k.startswith("p_")]) for row in rows}


@pytest.fixture(scope="module")
def external(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> dict:
    data = load_processed(trained.processed)
    raw_of = raw_ids_by_pseudonym(trained)
    test_ids = [raw_of[str(pid)] for pid in data.arrays["patient_id"][data.indices("test")]]
    drop = raw_subset(trained.raw, tmp_path_factory.mktemp("external") / "raw", test_ids)
    # one patient without a diagnosis: a labelled drop cannot score them
    unlabelled = test_ids[0]
    conditions = drop / "ehr" / "Condition.ndjson"
    kept = [line for line in conditions.read_text().splitlines()
            if json.loads(line)["subject"]["reference"] != f"Patient/{unlabelled}"]
    conditions.write_text("".join(f"{line}\n" for line in kept))
    root = tmp_path_factory.mktemp("external-out")
    result = run_external(trained.params, drop, trained.models, root / "admitted", root / "report")
    return {"data": data, "result": result, "root": root, "unlabelled": pseudonymizer(trained).pseudonym(unlabelled)}


def test_external_reproduces_the_evaluate_stage_on_the_same_patients(trained: Trained, external: dict) -> None:
    scored = _probabilities(external["root"] / "report" / TEST_PROBABILITIES_FILE)
    evaluated = _probabilities(trained.evaluation / TEST_PROBABILITIES_FILE)
    assert external["unlabelled"] not in scored
    assert set(scored) == set(evaluated) - {external["unlabelled"]}
    for pid, probs in scored.items():
        assert np.abs(probs - evaluated[pid]).max() <= EXACT, pid
    metrics = json.loads((external["root"] / "report" / "metrics.json").read_text())
    assert metrics["test"]["n"] == len(scored) == external["result"].n_patients
    assert sum(metrics["n_per_class"].values()) == len(scored)
    # every non-empty modality subset is reported, as in evaluate
    subsets = {r["scenario"] for r in metrics["robustness"] if r["scenario"].startswith("subset_")}
    assert subsets == {f"subset_{'+'.join(s)}" for s in modality_subsets()}


def test_patient_without_a_diagnosis_is_quarantined_and_counts_add_up(external: dict) -> None:
    admission = json.loads((external["root"] / "report" / "metrics.json").read_text())["admission"]
    assert admission["records_in"] == admission["accepted"] + admission["quarantined"]
    assert admission["quarantined"] >= 1 and sum(admission["quarantined_by_reason"].values()) == admission[
        "quarantined"]
    processed = load_processed(external["root"] / "admitted" / PROCESSED_SUBDIR)
    assert external["unlabelled"] not in set(processed.arrays["patient_id"].tolist())


def test_rare_classes_of_an_external_drop(trained: Trained) -> None:
    names = ["a", "b", "c"]
    labels = np.array([0] * 60 + [1] * 37 + [2] * 3)  # c: 3 % ≤ 5 %
    assert external_rare_classes(trained.params, labels, names) == [2]
    from meddiff.config import apply_overrides

    named = apply_overrides(trained.params, ["evaluate.rare_classes=[b]"])
    assert external_rare_classes(named, labels, names) == [1]
    with pytest.raises(ValueError, match="unknown classes"):
        external_rare_classes(apply_overrides(trained.params, ["evaluate.rare_classes=[z]"]), labels, names)
