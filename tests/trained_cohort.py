"""A tiny cohort taken through the training stages once per session (cohort → ingest → preprocess → train →
evaluate), for the apply-mode tests (prediction, monitoring, external validation): apply mode needs a model
trained on real preprocessing artefacts. The fixture ``trained`` is registered by ``tests/conftest.py``."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meddiff.config import Params, apply_overrides, params_from_dict

#: small enough for 2 CPU cores, large enough that every class is in the test split
COHORT = {
    "n_patients": 40, "class_prevalence": [0.4, 0.25, 0.2, 0.15], "volume_shape": [12, 24, 24],
    "pixel_spacing_mm": 8.0, "slice_thickness_mm": 12.0, "minority_site_fraction": 0.15,
    "minority_slice_thickness_mm": 16.0, "corrupt_fraction": 0.05, "num_workers": 2,
}
PREPROCESS = {"cache_dir": None, "spatial_size": [16, 16, 16], "pixdim_mm": [12.0, 12.0, 12.0],
              "max_note_tokens": 32, "vocab_size": 120}
TINY_MODEL = [
    "train.epochs=2", "train.batch_size=16", "train.model.image_channels=[4,8]", "train.model.d_model=16",
    "train.model.n_heads=2", "train.model.text_layers=1", "train.model.tabular_hidden=16",
    "train.diffusion.unet_channels=[8,16]", "train.diffusion.num_train_timesteps=50", "train.diffusion.refine_epochs=0",
    "train.diffusion.impute_missing_latents=false",  # predict and evaluate's test metrics do not impute
    "evaluate.n_repeats=1", "evaluate.n_bootstrap=10", "evaluate.masking_rates=[0.0]",
]


@dataclass(frozen=True)
class Trained:
    params: Params
    root: Path
    raw: Path
    processed: Path
    models: Path
    evaluation: Path
    registered_version: str


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    from meddiff.data.cohort import generate_cohort
    from meddiff.data.ingest import run_ingest
    from meddiff.data.preprocess import run_preprocess
    from meddiff.evaluation.evaluate import run_evaluate
    from meddiff.training.train import run_train

    root = tmp_path_factory.mktemp("prediction")
    params = params_from_dict({"seed": 7, "cohort": COHORT, "ingest": {"allow_ephemeral_key_for_synthetic": True},
                               "preprocess": PREPROCESS})
    params = apply_overrides(params, [
        *TINY_MODEL, f"tracking.tracking_uri=sqlite:///{root}/mlruns.db",
        f"tracking.artifact_location={root}/mlartifacts", f"paths.checkpoints={root}/checkpoints",
    ])
    os.environ.pop(params.ingest.deid_key_env, None)  # the cohort's own (ephemeral) key: reproducible pseudonyms
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    generate_cohort(params, root / "raw")
    run_ingest(params, root / "raw", root / "interim", root / "quarantine", root / "reports" / "ingest")
    run_preprocess(params, root / "interim", root / "processed", root / "reports" / "preprocess")
    result = run_train(params, root / "processed", root / "models")
    run_evaluate(params, root / "processed", root / "models", root / "reports" / "evaluate")
    return Trained(params, root, root / "raw", root / "processed", root / "models", root / "reports" / "evaluate",
                   result.registered_version)


def pseudonymizer(trained: Trained) -> Any:  # -> meddiff.data.deid.Pseudonymizer
    """The cohort's pseudonymizer (its ephemeral key): raw patient id → the id in the processed data."""
    from meddiff.data.deid import Pseudonymizer, resolve_key

    ingest = trained.params.ingest
    key, _ = resolve_key(ingest.deid_key_env, ingest.allow_ephemeral_key_for_synthetic, trained.raw)
    return Pseudonymizer(key, ingest.deid_max_date_shift_days)


def raw_ids_by_pseudonym(trained: Trained) -> dict[str, str]:
    """Every raw patient id of the cohort, keyed by its pseudonym (the ``patient_id`` of the processed data)."""
    pseudo = pseudonymizer(trained)
    patients = (trained.raw / "ehr" / "Patient.ndjson").read_text().splitlines()
    return {pseudo.pseudonym(pid): pid for pid in (json.loads(line)["id"] for line in patients)}


def _patient_of(resource: dict) -> str:
    if resource["resourceType"] == "Patient":
        return str(resource["id"])
    return str(resource["subject"]["reference"]).removeprefix("Patient/")


def raw_subset(raw: Path, target: Path, patients: list[str], without_image: set[str] = frozenset(),
               without_note: set[str] = frozenset(), without_labs: set[str] = frozenset(),
               malformed: set[str] = frozenset()) -> Path:
    """The raw files of ``patients`` (with the cohort's ``cohort.json``, hence the same pseudonyms), minus the
    modalities named, with an implausible birth date for the ``malformed`` ones."""
    target.mkdir(parents=True)
    shutil.copyfile(raw / "cohort.json", target / "cohort.json")
    for sub in ("imaging", "masks", "notes", "ehr"):
        (target / sub).mkdir()
    for pid in patients:
        if pid not in without_image and (raw / "imaging" / pid).is_dir():
            shutil.copytree(raw / "imaging" / pid, target / "imaging" / pid)
            if (raw / "masks" / f"{pid}.nii.gz").is_file():
                shutil.copyfile(raw / "masks" / f"{pid}.nii.gz", target / "masks" / f"{pid}.nii.gz")
        if pid not in without_note and (raw / "notes" / f"{pid}.txt").is_file():
            shutil.copyfile(raw / "notes" / f"{pid}.txt", target / "notes" / f"{pid}.txt")
    wanted = set(patients)
    for ndjson in (raw / "ehr").glob("*.ndjson"):
        lines = []
        for line in ndjson.read_text().splitlines():
            resource = json.loads(line)
            pid = _patient_of(resource)
            if pid not in wanted or (resource["resourceType"] == "Observation" and pid in without_labs):
                continue
            if resource["resourceType"] == "Patient" and pid in malformed:
                resource["birthDate"] = "1850-01-01"
                line = json.dumps(resource)
            lines.append(line)
        (target / "ehr" / ndjson.name).write_text("".join(f"{line}\n" for line in lines))
    return target
