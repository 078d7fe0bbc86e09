"""The reference a new drop is compared with: the monitored statistics of the *held-out* patients of the
model's dataset (validation and test splits), saved with the model (``<model>/monitoring/``) when it is
trained, so ``meddiff monitor`` needs only the model (from the registry) and the new drop — like
evidently's reference dataset. Held-out, not training, patients: the vocabulary was fitted on the
training notes (their unknown-word share is 0 by construction) and the encoders on the training
patients, so any new patient would look shifted against those; against patients the fit never saw, only
a real change does.

Files: ``reference_<group>.parquet`` per group of :data:`meddiff.monitoring.features.GROUPS`,
``latent_projection.npz`` (per modality the mean (d,) and principal axes (k, d) of the training latents)
and ``reference_patients.json`` (the pseudonyms of every patient of the model's dataset, all splits: a
labelled patient of a later drop is *new* when it is not among them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from meddiff import MODALITIES
from meddiff.data.dataset import ProcessedDataset
from meddiff.io import atomic_file, read_json, write_json
from meddiff.model.inference import encode_latent_stacks
from meddiff.model.multimodal import MedDiffModel
from meddiff.monitoring.features import GROUPS, LatentProjection, ehr_features, image_features, note_features

#: the model folder's subfolder holding the reference
MONITORING_DIR = "monitoring"
PROJECTION_FILE = "latent_projection.npz"
PATIENTS_FILE = "reference_patients.json"
#: the split the model was fitted on: never part of the reference
TRAIN_SPLIT = "train"


@dataclass(frozen=True)
class Reference:
    """What :func:`save_reference` wrote: per-group tables, the latent projection, the patients' pseudonyms."""

    tables: dict[str, pd.DataFrame]
    projection: LatentProjection
    patient_ids: frozenset[str]


def _latents(model: MedDiffModel, data: ProcessedDataset) -> tuple[np.ndarray, np.ndarray]:
    """(N, M, d) modality latents and (N, M) presence of every patient of ``data``."""
    stack = encode_latent_stacks(model, data, np.arange(len(data)))
    return stack.modality_latents.numpy(), data.arrays["modality_present"].astype(bool)


def feature_tables(
    data: ProcessedDataset, model: MedDiffModel | None = None, projection: LatentProjection | None = None,
) -> dict[str, pd.DataFrame]:
    """Every group's per-patient table for all patients of ``data``; ``latent`` only with a model and a
    projection (patients without any present modality's latent are left out of it)."""
    everyone = np.arange(len(data))
    tables = {"ehr": ehr_features(data, everyone), "note": note_features(data, everyone),
              "image": image_features(data, everyone)}
    if model is not None and projection is not None:
        tables["latent"] = projection.transform(*_latents(model, data)).dropna(how="all")
    return tables


def save_reference(directory: Path, model: MedDiffModel, data: ProcessedDataset, n_components: int) -> None:
    """Write the reference of ``data``'s held-out patients (every split but ``train``) into ``directory``,
    each file atomically; the patient list holds all of ``data``'s patients.

    Raises:
        ValueError: ``data`` has no held-out patient.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    held_out = data.subset(np.flatnonzero(data.arrays["split"] != TRAIN_SPLIT))
    if len(held_out) == 0:
        raise ValueError("no validation or test patients to serve as the monitoring reference")
    projection = LatentProjection.fit(*_latents(model, held_out), n_components)
    for group, table in feature_tables(held_out, model, projection).items():
        with atomic_file(directory / f"reference_{group}.parquet", "wb") as handle:
            table.to_parquet(handle, index=False)
    parts = (("mean", projection.mean), ("components", projection.components))
    arrays = {f"{kind}_{name}": values for kind, per in parts for name, values in per.items()}
    with atomic_file(directory / PROJECTION_FILE, "wb") as handle:
        np.savez(handle, **arrays)
    write_json(directory / PATIENTS_FILE, sorted(data.arrays["patient_id"].astype(str).tolist()))


def load_reference(directory: Path) -> Reference:
    """What :func:`save_reference` wrote.

    Raises:
        FileNotFoundError: naming the folder, when the model carries no monitoring reference.
    """
    directory = Path(directory)
    if not (directory / PROJECTION_FILE).is_file():
        raise FileNotFoundError(f"{directory}: no monitoring reference ({PROJECTION_FILE}); the model was trained "
                                "before references were saved with it: retrain it to monitor drift")
    tables = {group: pd.read_parquet(directory / f"reference_{group}.parquet") for group in GROUPS
              if (directory / f"reference_{group}.parquet").is_file()}
    with np.load(directory / PROJECTION_FILE, allow_pickle=False) as npz:
        mean = {name: npz[f"mean_{name}"] for name in MODALITIES if f"mean_{name}" in npz.files}
        components = {name: npz[f"components_{name}"] for name in MODALITIES if f"components_{name}" in npz.files}
    return Reference(tables, LatentProjection(mean, components), frozenset(read_json(directory / PATIENTS_FILE)))
