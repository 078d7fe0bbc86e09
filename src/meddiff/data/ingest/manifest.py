"""The per-patient manifest, assembled from the records the suites accepted; one decision per function.

A patient enters ``interim/manifest.parquet`` when its Patient record is accepted, its accepted
Conditions agree on one diagnosis class (:func:`decide_labels`; in apply mode, for new patients, a patient
without one is admitted with label ``None``) and it has at least one accepted
modality (:class:`Modalities`). Its row holds the keyed pseudonym, capped age, sex, site, the median
of each lab (:func:`median_labs`), the de-identified note (:class:`PatientNotes`) and the paths of its
image, header and mask moved to their pseudonymous names (:func:`place_image`). Lesion masks must
match their image's geometry (:func:`attach_lesion_masks`); every other accepted record of a
patient who is not in the manifest is an ``orphan_record`` (:func:`quarantine_orphans`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from meddiff.data.deid import PatientIdentifiers, Pseudonymizer, cap_age, deidentify_text
from meddiff.data.ingest.imaging import interim_image_name, save_nifti
from meddiff.data.notes import normalise_note
from meddiff.data.quarantine import Ledger, Record
from meddiff.data.validation import RECORD_ID

MANIFEST_FILE = "manifest.parquet"
HEADERS_DIR = "headers"
#: the site of a patient whose Patient names no managingOrganization (most exports): a subgroup of its own
UNKNOWN_SITE = "unknown"
#: manifest column: contrast (HU) of the patient's masked lesion to the surrounding brain, NaN without one
LESION_CONTRAST = "lesion_contrast_hu"
#: the synthetic drop's provenance file and its lesion ledger (``meddiff cohort`` writes both)
COHORT_LEDGER, LESION_LEDGER_KEY = "cohort.json", "lesions"
#: how far a mask's affine may differ from its image's (mm) and still be the same grid
AFFINE_TOLERANCE_MM = 1e-3
#: record kinds that never belong to a patient's modalities (the Patient itself, stray files)
_NOT_PATIENT_DATA = ("patient", "file")


@dataclass(frozen=True)
class InterimLayout:
    """Where ingest writes: ``images/``, ``masks/`` and de-identified DICOM ``headers/`` under ``root``."""

    root: Path

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def masks(self) -> Path:
        return self.root / "masks"

    @property
    def headers(self) -> Path:
        return self.root / HEADERS_DIR


@dataclass(frozen=True)
class ManifestInputs:
    """The validated tables (all rows; acceptance is read from the ledger) and what de-identifies them."""

    patients: pd.DataFrame
    observations: pd.DataFrame
    conditions: pd.DataFrame
    notes: pd.DataFrame
    series: pd.DataFrame
    identifiers: dict[str, PatientIdentifiers]  # FHIR Patient record id -> names to scrub from notes
    mask_paths: list[Path]
    #: raw PatientID -> person names of every readable DICOM header of that patient, rejected series included
    dicom_names: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class ManifestContext:
    """Where the manifest's files go and how patients are pseudonymised."""

    ledger: Ledger
    pseudo: Pseudonymizer
    interim: InterimLayout
    raw_dir: Path
    labs: list[str]
    max_age: int
    #: training data need a diagnosis; apply mode (new patients) admits a patient without one (label None)
    label_required: bool = True


@dataclass(frozen=True)
class Modalities:
    """Which accepted modalities a patient has."""

    has_image: bool
    has_note: bool
    has_labs: bool

    def any(self) -> bool:
        return self.has_image or self.has_note or self.has_labs


def manifest_columns(labs: list[str]) -> list[str]:
    """The manifest's columns, in order (one float column per lab, NaN when not measured)."""
    return ["patient_id", "site", "label", "age", "sex", *labs, "note", "image_path", "series_instance_uid",
            "has_image", "has_note", "has_labs", "mask_path", "image_modality", LESION_CONTRAST]


def _accepted(frame: pd.DataFrame, accepted_ids: set[str]) -> pd.DataFrame:
    return frame[frame[RECORD_ID].isin(accepted_ids)]


def decide_labels(conditions: pd.DataFrame, ledger: Ledger) -> dict[str, str]:
    """Patient -> diagnosis class, from accepted Conditions; disagreeing ones are ``conflicting_labels``."""
    labels: dict[str, str] = {}
    for patient_id, group in conditions.groupby("patient_id"):
        distinct = sorted(set(group["label"]))
        if len(distinct) > 1:
            for record_id in group[RECORD_ID]:
                ledger.quarantine(ledger.get("condition", record_id), "conflicting_labels",
                                  f"patient {patient_id} has Conditions mapping to {distinct}")
        else:
            labels[str(patient_id)] = distinct[0]
    return labels


def median_labs(observations: pd.DataFrame) -> pd.DataFrame:
    """Patient x lab: the median of accepted values (robust to a repeated measurement)."""
    return observations.pivot_table(index="patient_id", columns="lab", values="value", aggfunc="median")


@dataclass(frozen=True)
class PatientNotes:
    """The accepted notes of each patient, read from the note table one patient at a time (issue 14: taking
    every text out of the table at once held the cohort's notes twice more while the manifest was built)."""

    texts: pd.Series  # the note texts, in record id order
    rows: dict[str, np.ndarray]  # patient -> positions of its notes in ``texts``

    @classmethod
    def of(cls, notes: pd.DataFrame) -> PatientNotes:
        """The notes of ``notes`` (``RECORD_ID``, ``patient_id``, ``text``) by patient."""
        ordered = notes.sort_values(RECORD_ID)
        return cls(ordered["text"], {str(pid): rows for pid, rows in ordered.groupby("patient_id").indices.items()})

    def __contains__(self, patient_id: object) -> bool:
        return patient_id in self.rows

    def joined(self, patient_id: str) -> str:
        """The patient's notes as one normalised text, joined in record id order."""
        return " ".join(normalise_note(str(self.texts.iat[row])) for row in self.rows[patient_id])


def admission_problem(patient_id: str, labels: dict[str, str], modalities: Modalities,
                      label_required: bool = True) -> tuple[str, str] | None:
    """Why a patient whose Patient record was accepted stays out of the manifest (reason, message), or ``None``.
    Without ``label_required`` (apply mode) a patient with no diagnosis is admitted."""
    if label_required and patient_id not in labels:
        return "missing_label", f"patient {patient_id} has no accepted Condition with a mapped ICD-10 code"
    if not modalities.any():
        return "no_modality", f"patient {patient_id} has no accepted image, note or labs"
    return None


def _lab_columns(patient_id: str, lab_values: pd.DataFrame, labs: list[str], has_labs: bool) -> dict[str, float]:
    return {lab: float(lab_values.loc[patient_id, lab] if has_labs and lab in lab_values.columns else np.nan)
            for lab in labs}


def place_image(series: pd.Series, pseudonym: str, context: ManifestContext) -> dict[str, Any]:
    """Move the patient's assembled image (and BraTS mask) to its pseudonymous name; keep its header.

    Returns the manifest's ``image_path``, ``series_instance_uid`` (pseudonymous), ``mask_path`` and
    ``image_modality`` (DICOM Modality: ``CT`` or ``MR``; preprocess scales intensities by it).
    """
    interim, uid = context.interim, context.pseudo.uid(series["series_uid"])
    target = interim.images / f"{pseudonym}.nii.gz"
    (interim.images / interim_image_name(context.pseudo, series["series_uid"])).replace(target)
    if isinstance(series["header_file"], str):
        (interim.headers / series["header_file"]).replace(interim.headers / f"{pseudonym}.json")
    mask_path = None
    if isinstance(series["mask_file"], str):
        (interim.images / series["mask_file"]).replace(interim.masks / f"{pseudonym}.nii.gz")
        mask_path = f"masks/{pseudonym}.nii.gz"
    return {"image_path": str(target.relative_to(interim.root)), "series_instance_uid": uid, "mask_path": mask_path,
            "image_modality": series["modality"]}


def lesion_contrasts(raw_dir: Path) -> dict[str, float]:
    """Raw patient id -> contrast (HU) of its masked lesion to the surrounding brain, from the lesion ledger
    of the drop's ``cohort.json`` (the synthetic cohort's own record; explanations are scored on lesions a
    reader could see). Empty for a drop without that ledger (real data: the column stays NaN)."""
    path = Path(raw_dir) / COHORT_LEDGER
    if not path.is_file():
        return {}
    try:
        ledger = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    entries = ledger.get(LESION_LEDGER_KEY, []) if isinstance(ledger, dict) else []
    return {str(entry["patient_id"]): float(entry["contrast_hu"]) for entry in entries
            if isinstance(entry, dict) and "patient_id" in entry and "contrast_hu" in entry}


def _identifiers(patient_id: str, record_id: str, identifiers: dict[str, PatientIdentifiers],
                 dicom_names: dict[str, tuple[str, ...]]) -> PatientIdentifiers:
    """What to scrub from the patient's note: the FHIR Patient's identifiers and every person name in the
    patient's DICOM headers (whether or not its series was accepted)."""
    who = identifiers.get(record_id, PatientIdentifiers(patient_id))
    if dicom_names.get(patient_id):
        who = who.merged(PatientIdentifiers(patient_id, names=dicom_names[patient_id]))
    return who


def _mask_problem(data: np.ndarray, affine: np.ndarray, shape: tuple[int, ...], image_affine: np.ndarray,
                  ) -> tuple[str, str] | None:
    """Why a lesion mask does not fit its image (reason, message), or ``None``."""
    if data.shape != shape or not np.allclose(affine, image_affine, atol=AFFINE_TOLERANCE_MM):
        return "geometry_mismatch", f"mask shape {data.shape} / affine differ from the image ({shape})"
    if not np.isin(np.unique(data), [0, 1]).all():
        return "invalid_mask", f"mask values {np.unique(data)[:5]} are not binary"
    return None


def attach_lesion_masks(mask_paths: list[Path], series: pd.DataFrame, pseudonym_of: dict[str, str],
                        context: ManifestContext) -> dict[str, str]:
    """``masks/<patient>.nii.gz`` -> ``lesion_mask`` records; those that fit an accepted image are kept.

    ``series``: accepted image series indexed by raw patient id; ``pseudonym_of``: raw id -> pseudonym of
    each manifest patient. A mask of a patient outside the manifest stays accepted here and is orphaned
    with the patient's other records. Returns pseudonym -> ``mask_path`` of each mask written (uint8).
    """
    geometry = {pid: (tuple(s["shape"]), np.asarray(s["affine"])) for pid, s in series.iterrows()}
    ledger, written = context.ledger, {}
    for path in mask_paths:
        patient_id = path.name.removesuffix(".nii.gz")
        record = ledger.add(Record("lesion_mask", f"mask/{patient_id}", str(path.relative_to(context.raw_dir)),
                                   patient_id=patient_id, files=(path,)))
        if patient_id not in pseudonym_of:
            continue
        if patient_id not in geometry:
            ledger.quarantine(record, "orphan_record", f"patient {patient_id} has no accepted image for this mask")
            continue
        try:
            mask = nib.load(path)
            data = np.asarray(mask.dataobj)
        except Exception as error:  # any decoder failure (gzip, header, truncation) means the file is unreadable
            ledger.quarantine(record, "unreadable_mask", f"cannot read NIfTI: {type(error).__name__}: {error}")
            continue
        problem = _mask_problem(data, mask.affine, *geometry[patient_id])
        if problem is not None:
            ledger.quarantine(record, *problem)
            continue
        pseudonym = pseudonym_of[patient_id]
        save_nifti(data.astype(np.uint8), np.asarray(mask.affine), context.interim.masks / f"{pseudonym}.nii.gz")
        written[pseudonym] = f"masks/{pseudonym}.nii.gz"
    return written


def quarantine_orphans(ledger: Ledger, in_manifest: set[str]) -> None:
    """Every still-accepted record of a patient not in the manifest becomes an ``orphan_record``."""
    patient_reasons = {r.patient_id: r.reason for r in ledger.of_kind("patient") if r.patient_id}
    for record in ledger.records:
        if record.kind in _NOT_PATIENT_DATA or not record.accepted or record.patient_id in in_manifest:
            continue
        why = patient_reasons.get(record.patient_id)
        detail = f"its Patient was quarantined ({why})" if why else "no Patient resource has this id"
        ledger.quarantine(record, "orphan_record", f"record of patient {record.patient_id}: {detail}")


def assemble_manifest(inputs: ManifestInputs, context: ManifestContext) -> pd.DataFrame:
    """One row per admitted patient (``manifest_columns``), sorted by pseudonym.

    Raises ``RuntimeError`` if two patients get the same pseudonym (a truncated-HMAC collision).
    """
    ledger = context.ledger
    accepted_ids = {r.record_id for r in ledger.records if r.accepted}
    labels = decide_labels(_accepted(inputs.conditions, accepted_ids), ledger)
    lab_values = median_labs(_accepted(inputs.observations, accepted_ids))
    notes = PatientNotes.of(_accepted(inputs.notes, accepted_ids))
    series_ok = _accepted(inputs.series, accepted_ids).set_index("patient_id")

    rows = []
    for patient_id, patient in _accepted(inputs.patients, accepted_ids).set_index("patient_id").iterrows():
        record = ledger.get("patient", patient[RECORD_ID])
        modalities = Modalities(
            has_image=patient_id in series_ok.index, has_note=patient_id in notes,
            has_labs=patient_id in lab_values.index and bool(lab_values.loc[patient_id].notna().any()))
        problem = admission_problem(str(patient_id), labels, modalities, context.label_required)
        if problem is not None:
            ledger.quarantine(record, *problem)
            continue
        pseudonym = context.pseudo.pseudonym(str(patient_id))
        series = series_ok.loc[patient_id] if modalities.has_image else None
        who = _identifiers(str(patient_id), patient[RECORD_ID], inputs.identifiers, inputs.dicom_names)
        rows.append({
            "patient_id": pseudonym, "raw_id": patient_id, "label": labels.get(patient_id),
            "site": patient["site"] if isinstance(patient["site"], str) and patient["site"] else UNKNOWN_SITE,
            "age": cap_age(float(patient["age"]) if patient["age"] is not None else np.nan, context.max_age),
            "sex": patient["sex"],
            **_lab_columns(patient_id, lab_values, context.labs, modalities.has_labs),
            **(place_image(series, pseudonym, context) if series is not None
               else {"image_path": None, "series_instance_uid": None, "mask_path": None, "image_modality": None}),
            "note": deidentify_text(notes.joined(patient_id), who) if modalities.has_note else None,
            "has_image": modalities.has_image, "has_note": modalities.has_note, "has_labs": modalities.has_labs,
        })
    rows.sort(key=lambda row: row["patient_id"])  # the manifest's order: no sorted copy of the frame later
    manifest = pd.DataFrame(rows, columns=["raw_id", *manifest_columns(context.labs)])
    del rows  # the notes are in the frame now (issue 14: not held twice while the masks are checked)
    if not manifest["patient_id"].is_unique:
        raise RuntimeError("two patients share a pseudonym (HMAC truncation collision); widen the pseudonym")

    in_manifest = set(manifest["raw_id"])
    pseudonym_of = dict(zip(manifest["raw_id"], manifest["patient_id"], strict=True))
    written_masks = attach_lesion_masks(inputs.mask_paths, series_ok, pseudonym_of, context)
    if written_masks:
        manifest["mask_path"] = manifest["patient_id"].map(written_masks).fillna(manifest["mask_path"])
    contrast = manifest["raw_id"].map(lesion_contrasts(context.raw_dir)).astype(float)
    manifest[LESION_CONTRAST] = contrast.where(manifest["mask_path"].notna())
    quarantine_orphans(ledger, in_manifest)
    for folder in (context.interim.images, context.interim.headers):
        for leftover in folder.glob("2.25.*"):  # still under its pseudonymous UID: not kept
            leftover.unlink()
    return manifest.drop(columns=["raw_id"]).reset_index(drop=True)
