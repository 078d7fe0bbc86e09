"""``meddiff cohort``: a deterministic synthetic multimodal head-CT cohort in ``raw_dir``.

Layout written (see ``docs/data.md``)::

    imaging/<patient>/<StudyInstanceUID>/<SeriesInstanceUID>/<InstanceNumber>.dcm   CT series (PS3.3 A.3)
    masks/<patient>.nii.gz                                        lesion mask, RAS affine (NIfTI-1)
    ehr/Patient.ndjson, Observation.ndjson, Condition.ndjson      FHIR R4 bulk-data NDJSON
    notes/<patient>.txt                                           free-text ED note
    cohort.json                                                   provenance, injected-fault ledger and
                                                                  lesion ledger (kind, radius, contrast in HU)

:mod:`meddiff.data.cohort_drops` writes other drops in the same layout: a small unlabelled drop of new
patients for ``meddiff predict`` and a large labelled external-validation drop.

Patients are generated one by one from ``np.random.default_rng([seed, index])`` in worker processes
and streamed to disk, so the cohort never sits in memory and the output does not depend on the
number of workers. No modality alone determines the diagnosis (see ``bench/cohort_separability.py``).
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from meddiff.config import CohortConfig, Params, ParamsError
from meddiff.data.dicom_writer import Scanner, StudyInfo, deterministic_uid, write_ct_series
from meddiff.data.fhir_writer import (
    LABS,
    FakeIdentity,
    condition_resource,
    dumps,
    observation_resource,
    patient_resource,
    sample_lab,
)
from meddiff.data.geometry import ras_affine
from meddiff.data.synthetic_anatomy import add_lesion, head_volume, voxel_centres
from meddiff.data.synthetic_notes import clinical_note
from meddiff.io import atomic_dir, write_json

LOG = logging.getLogger(__name__)

MAIN_SITE = "site_a"
MINORITY_SITE = "site_b"
COHORT_FILE = "cohort.json"

#: injected fault -> (record kind, quarantine reason) that ingest must report for it
FAULT_REASONS: dict[str, tuple[str, str]] = {
    "truncated_dicom": ("image_series", "truncated_dicom"),
    "non_dicom_file": ("file", "not_dicom"),
    "out_of_range_lab": ("observation", "out_of_range"),
    "unknown_unit": ("observation", "unknown_unit"),
    "duplicate_patient": ("patient", "duplicate_record"),
    "empty_note": ("note", "note_too_short"),
    "non_utf8_note": ("note", "not_utf8"),
    "implausible_birth_date": ("patient", "out_of_range"),
}

ICD10_DISPLAY: dict[str, str] = {
    "Z03.89": "Encounter for observation for other suspected diseases and conditions ruled out",
    "I63.9": "Cerebral infarction, unspecified",
    "I61.9": "Nontraumatic intracerebral hemorrhage, unspecified",
    "G06.0": "Intracranial abscess and granuloma",
}

#: mean, sd of age (years) per diagnosis
AGE_MODEL: dict[str, tuple[float, float]] = {
    "healthy": (52.0, 18.0),
    "ischemic_stroke": (70.0, 11.0),
    "intracerebral_hemorrhage": (66.0, 12.0),
    "brain_abscess": (45.0, 17.0),
}

#: own random stream of the "atrophy age" that sizes the ventricles: a stream of its own keeps every other
#: draw of the patient (age, labs, note, lesion, noise) bit-identical to a cohort without it
ATROPHY_STREAM = 0xA7
#: mean, sd (years) of the atrophy age, the same for every diagnosis. Ventricles used to widen with the
#: patient's own age, and strokes are older, so ventricle size alone separated stroke from the rest
#: (CSF-fraction AUC 0.77; a CNN learned that shortcut instead of the infarct). Drawn apart from the
#: diagnosis, the ventricles vary as much as before but say nothing about the label (AUC 0.57, the rest
#: being the infarcts' own dark voxels); age stays a legitimate signal of the EHR and the note.
ATROPHY_AGE_MODEL: tuple[float, float] = (58.0, 18.0)
#: the range atrophy ages are clipped to (years), as patients' ages are
AGE_RANGE_YEARS: tuple[int, int] = (18, 95)


def atrophy_age(seed: int, index: int) -> float:
    """The age (years) whose atrophy sizes patient ``index``'s ventricles: diagnosis-independent, own stream."""
    rng = np.random.default_rng([seed, index, ATROPHY_STREAM])
    return float(np.clip(rng.normal(*ATROPHY_AGE_MODEL), *AGE_RANGE_YEARS))


SCANNERS: dict[str, Scanner] = {
    MAIN_SITE: Scanner("Site A Teaching Hospital", "SYNTHETIC MEDICAL", "SynthCT 64",
                       pixel_representation=0, bits_stored=12, rescale_slope=1.0),
    MINORITY_SITE: Scanner("Site B Community Hospital", "OTHERVENDOR", "LegacyCT 16",
                           pixel_representation=1, bits_stored=16, rescale_slope=0.5, kvp=130.0,
                           descending_instances=True),
}


#: invented names and places for the fake PHI (none is a clinical word, so scans for leaks are exact)
GIVEN_NAMES: tuple[str, ...] = (
    "Eleanor", "Marcus", "Priya", "Tobias", "Ingrid", "Rafael", "Siobhan", "Dmitri", "Amara", "Lucian",
    "Henrietta", "Oskar", "Beatrix", "Cornelius", "Delphine", "Evander", "Fiona", "Gideon", "Harriet", "Ignatius",
)
FAMILY_NAMES: tuple[str, ...] = (
    "Whitfield", "Okafor", "Lindqvist", "Moreau", "Castellano", "Nakamura", "Brennan", "Haddad", "Kowalski",
    "Abernathy", "Delacroix", "Fairbanks", "Gallagher", "Hargrove", "Ivanova", "Jablonski", "Kingsley",
    "Lockhart", "Montague", "Norberg", "Ostrowski", "Pemberton", "Quintero", "Rasmussen", "Thornbury",
)
STREETS: tuple[str, ...] = ("Maple", "Juniper", "Harborview", "Chestnut", "Wexford", "Sycamore", "Larkspur",
                            "Ashbury")
STREET_TYPES: tuple[str, ...] = ("Street", "Avenue", "Road", "Lane")
CITIES: tuple[str, ...] = ("Millbrook", "Easthaven", "Cedar Falls", "Port Ellison", "Ridgemont")


def fake_identity(seed: int, index: int) -> FakeIdentity:
    """Invented name, address, phone and physician of patient ``index`` (own random stream)."""
    rng = np.random.default_rng([seed, index, 0x9E1])

    def pick(options: tuple[str, ...]) -> str:
        return options[int(rng.integers(len(options)))]

    return FakeIdentity(
        given=pick(GIVEN_NAMES), family=pick(FAMILY_NAMES),
        street=f"{int(rng.integers(2, 9900))} {pick(STREETS)} {pick(STREET_TYPES)}", city=pick(CITIES),
        postal_code=f"{int(rng.integers(10000, 99999))}",
        phone=f"({int(rng.integers(201, 989))}) 555-{int(rng.integers(1000, 9999))}",
        physician=(pick(GIVEN_NAMES), pick(FAMILY_NAMES)),
    )


def phi_note(identity: FakeIdentity, patient_id: str, birth_date: datetime.date, visit: datetime.date,
             body: str) -> str:
    """An ED note wrapped in the identifying lines real notes carry (all invented)."""
    return (
        f"ED note {visit.month}/{visit.day}/{visit.year}. Patient: {identity.full_name}, DOB "
        f"{birth_date.strftime('%m/%d/%Y')}, MRN {patient_id}. Lives at {identity.street}, {identity.city} "
        f"{identity.postal_code}.\n{body.strip()}\nSeen by Dr. {identity.physician[1]}; contact {identity.phone}.\n"
    )


@dataclass(frozen=True)
class PatientPlan:
    """What is decided for a patient before generation (small: the whole plan fits in memory)."""

    index: int
    patient_id: str
    diagnosis: str
    site: str
    has_image: bool
    has_note: bool
    has_labs: bool
    fault: str | None


@dataclass
class PatientOutput:
    """What a worker hands back: NDJSON lines and counts (images and notes are already on disk)."""

    patient_lines: list[str]
    observation_lines: list[str]
    condition_lines: list[str]
    n_dicom_files: int
    has_note: bool
    #: the ledger entry of the masked lesion (kind, radius_mm, target_hu, contrast_hu); None without one
    lesion: dict[str, float | str] | None = None


@dataclass
class CohortResult:
    """Summary of ``meddiff cohort``."""

    raw_dir: Path
    n_patients: int
    n_dicom_files: int
    n_observations: int
    n_notes: int
    class_counts: dict[str, int] = field(default_factory=dict)
    site_counts: dict[str, int] = field(default_factory=dict)
    faults: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def _exact_counts(total: int, fractions: list[float]) -> list[int]:
    """Largest-remainder apportionment of ``total`` to ``fractions`` (normalised)."""
    weights = np.asarray(fractions, dtype=float)
    quotas = weights / weights.sum() * total
    counts = np.floor(quotas).astype(int)
    for index in np.argsort(-(quotas - counts), kind="stable")[: total - counts.sum()]:
        counts[index] += 1
    return counts.tolist()


def plan_cohort(config: CohortConfig, classes: list[str], seed: int, id_prefix: str = "P") -> list[PatientPlan]:
    """Diagnosis (one of ``classes``, the ``dataset.classes`` names, at ``config.class_prevalence``), site,
    available modalities and injected fault of every patient (deterministic); patient ids are ``id_prefix`` +
    a five-digit number.

    Raises:
        ParamsError: ``cohort.class_prevalence`` does not give one share per class.
    """
    if len(config.class_prevalence) != len(classes):
        raise ParamsError(f"cohort.class_prevalence has {len(config.class_prevalence)} entries but dataset.classes "
                          f"has {len(classes)} ({classes}): the cohort needs one share per class")
    rng = np.random.default_rng([seed, 0xC0407])
    n = config.n_patients
    diagnoses = np.repeat(classes, _exact_counts(n, config.class_prevalence))
    rng.shuffle(diagnoses)
    n_minority = round(config.minority_site_fraction * n)
    sites = np.array([MINORITY_SITE] * n_minority + [MAIN_SITE] * (n - n_minority))
    rng.shuffle(sites)
    has_image = rng.random(n) >= config.image_missing_fraction
    has_note = rng.random(n) >= config.note_missing_fraction
    has_labs = rng.random(n) >= config.labs_missing_fraction
    faults: dict[int, str] = {}
    if config.corrupt_fraction > 0:
        n_faults = min(max(len(FAULT_REASONS), round(config.corrupt_fraction * n)), n)
        rare = classes[int(np.argmin(config.class_prevalence))]
        candidates = [i for i in rng.permutation(n).tolist() if diagnoses[i] != rare] or list(range(n))
        kinds = list(FAULT_REASONS)
        for position, index in enumerate(candidates[:n_faults]):
            faults[index] = kinds[position % len(kinds)]
    plans = []
    for i in range(n):
        fault = faults.get(i)
        plans.append(PatientPlan(
            index=i,
            patient_id=f"{id_prefix}{i + 1:05d}",
            diagnosis=str(diagnoses[i]),
            site=str(sites[i]),
            has_image=bool(has_image[i]) or fault in ("truncated_dicom", "non_dicom_file"),
            has_note=bool(has_note[i]) or fault in ("empty_note", "non_utf8_note"),
            has_labs=bool(has_labs[i]) or fault in ("out_of_range_lab", "unknown_unit"),
            fault=fault,
        ))
    return plans


def _generate_patient(task: tuple[PatientPlan, Params, Path]) -> PatientOutput:
    """Write one patient's DICOM series, mask and note; return its FHIR lines."""
    plan, params, raw_dir = task
    config = params.cohort
    rng = np.random.default_rng([params.seed, plan.index])
    pid = plan.patient_id
    mean_age, sd_age = AGE_MODEL.get(plan.diagnosis, (55.0, 18.0))
    age = int(np.clip(round(rng.normal(mean_age, sd_age)), *AGE_RANGE_YEARS))
    sex = "male" if rng.random() < 0.5 else "female"
    study_day = datetime.date(2023, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 540)))
    birth_date = study_day - datetime.timedelta(days=int(age * 365.25 + rng.integers(1, 360)))
    if plan.fault == "implausible_birth_date":
        birth_date = datetime.date(1850, 1, 1)
    study_time = f"{int(rng.integers(0, 24)):02d}{int(rng.integers(0, 60)):02d}00"
    effective = f"{study_day.isoformat()}T{study_time[:2]}:{study_time[2:4]}:00Z"

    identity = fake_identity(params.seed, plan.index)
    n_files, lesion = 0, None
    if plan.has_image:
        n_files, lesion = _write_imaging(rng, plan, params, raw_dir, sex, study_day, study_time, birth_date,
                                         identity, age)
    else:  # keep the random stream aligned whether or not the image is written
        rng.random()

    patient_line = dumps(patient_resource(pid, sex, birth_date.isoformat(), plan.site, identity))
    patient_lines = [patient_line, patient_line] if plan.fault == "duplicate_patient" else [patient_line]

    observation_lines = []
    if plan.has_labs:
        for lab in LABS:
            value = sample_lab(rng, plan.diagnosis, lab)
            missing = rng.random() < config.lab_missing_fraction
            alternative = rng.random() < config.lab_alternative_unit_fraction
            unit_override = None
            if plan.fault == "out_of_range_lab" and lab == "wbc":
                value, missing = 950.0, False
            if plan.fault == "unknown_unit" and lab == "glucose":
                unit_override, missing, alternative = "mg%", False, False
            if missing:
                continue
            resource = observation_resource(  # FHIR ids are [A-Za-z0-9-.]{1,64}: no underscore
                f"obs-{pid}-{lab.replace('_', '-')}", pid, lab, value, effective, alternative_unit=alternative,
                unit_override=unit_override,
            )
            observation_lines.append(dumps(resource))

    icd10 = params.dataset.class_icd10[plan.diagnosis]
    condition = condition_resource(
        f"cond-{pid}", pid, icd10, ICD10_DISPLAY.get(icd10, plan.diagnosis), effective
    )

    note_path = raw_dir / "notes" / f"{pid}.txt"
    if plan.has_note:
        text = phi_note(identity, pid, birth_date, study_day, clinical_note(rng, plan.diagnosis, age, sex))
        if plan.fault == "empty_note":
            note_path.write_bytes(b"")
        elif plan.fault == "non_utf8_note":
            note_path.write_bytes((text.strip() + " Temp 38.5°C.\n").encode("latin-1"))
        else:
            note_path.write_text(text, encoding="utf-8")
    return PatientOutput(patient_lines, observation_lines, [dumps(condition)], n_files, plan.has_note, lesion)


def _write_imaging(
    rng: np.random.Generator, plan: PatientPlan, params: Params, raw_dir: Path, sex: str,
    study_day: datetime.date, study_time: str, birth_date: datetime.date, identity: FakeIdentity, age: int,
) -> tuple[int, dict[str, float | str] | None]:
    """Write the CT series and the lesion mask; return the number of DICOM files and the masked lesion's
    ledger entry (None for a healthy head: its mimics carry no mask)."""
    config = params.cohort
    minority = plan.site == MINORITY_SITE
    n_slices, rows, columns = config.volume_shape
    thickness = config.minority_slice_thickness_mm if minority else config.slice_thickness_mm
    if minority:  # same head coverage with thicker slices
        n_slices = max(2, round(n_slices * config.slice_thickness_mm / thickness))
    spacing = (config.pixel_spacing_mm, config.pixel_spacing_mm, thickness)
    shape = (columns, rows, n_slices)
    points = voxel_centres(shape, spacing)
    volume, brain, centre, semi_axes = head_volume(rng, points, atrophy_age(params.seed, plan.index))
    volume, mask, lesions = add_lesion(rng, volume, points, brain, centre, semi_axes, plan.diagnosis)
    masked = [lesion for lesion in lesions if lesion.kind == plan.diagnosis]
    ledger = ({"patient_id": plan.patient_id, "kind": masked[0].kind, "radius_mm": masked[0].radius_mm,
               "target_hu": masked[0].target_hu, "contrast_hu": masked[0].contrast_hu} if masked else None)
    if minority:
        volume = volume * config.minority_intensity_scale + config.minority_intensity_offset_hu
    noise = config.minority_noise_hu if minority else config.noise_hu
    volume = volume + rng.normal(0.0, noise, size=volume.shape)

    study_uid = deterministic_uid(params.seed, plan.patient_id, "study")
    series_uid = deterministic_uid(params.seed, plan.patient_id, "series")
    info = StudyInfo(
        patient_id=plan.patient_id,
        patient_sex="M" if sex == "male" else "F",
        patient_birth_date=birth_date.strftime("%Y%m%d"),
        patient_age=f"{min(age, 999):03d}Y",
        study_date=study_day.strftime("%Y%m%d"),
        study_time=study_time,
        accession_number=f"ACC{plan.index + 1:08d}",
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        frame_of_reference_uid=deterministic_uid(params.seed, plan.patient_id, "frame"),
        patient_name=f"{identity.family}^{identity.given}",
        referring_physician_name=f"{identity.physician[1]}^{identity.physician[0]}",
    )
    first_position = tuple(float(-(n - 1) / 2.0 * s) for n, s in zip(shape, spacing, strict=True))
    series_dir = raw_dir / "imaging" / plan.patient_id / study_uid / series_uid
    paths = write_ct_series(
        series_dir, volume, config.pixel_spacing_mm, thickness, first_position, info, SCANNERS[plan.site]
    )
    affine = ras_affine(first_position, [1, 0, 0, 0, 1, 0], (spacing[1], spacing[0]), (0.0, 0.0, thickness))
    mask_image = nib.Nifti1Image(mask, affine)
    mask_image.set_qform(affine, code=1)
    mask_image.set_sform(affine, code=1)
    nib.save(mask_image, raw_dir / "masks" / f"{plan.patient_id}.nii.gz")

    if plan.fault == "truncated_dicom":  # an interrupted transfer: half of a middle slice arrives
        victim = sorted(paths)[len(paths) // 2]
        data = victim.read_bytes()
        victim.write_bytes(data[: int(len(data) * 0.6)])
    if plan.fault == "non_dicom_file":
        (series_dir.parent / "export_log.txt").write_text(
            f"scanner export log for accession {info.accession_number}: 1 series sent\n"
        )
    return len(paths), ledger


def cohort_provenance(params: Params) -> dict[str, object]:
    """The settings that shaped the cohort, as ``cohort.json`` records them: ``params.cohort`` with the classes and
    the code each is written as (``dataset.classes``) after ``n_patients``, as the file has always listed them
    (the ephemeral de-identification key hashes the file). ``num_workers`` does not change the output: left out."""
    settings = params.cohort.model_dump(mode="json", exclude={"num_workers"})
    provenance: dict[str, object] = {"n_patients": settings.pop("n_patients"), "classes": params.dataset.class_names,
                                     "class_prevalence": settings.pop("class_prevalence"),
                                     "condition_icd10": params.dataset.class_icd10}
    return {**provenance, **settings}


def _worker_count(config: CohortConfig, n_tasks: int) -> int:
    workers = config.num_workers or (os.cpu_count() or 1)
    return max(1, min(workers, n_tasks))


def generate_cohort(params: Params, raw_dir: Path) -> CohortResult:
    """Write the synthetic cohort of ``params.cohort`` into ``raw_dir`` (replaced atomically)."""
    plans = plan_cohort(params.cohort, params.dataset.class_names, params.seed)
    return write_drop(params, plans, Path(raw_dir), labelled=True, extra={})


def write_drop(params: Params, plans: list[PatientPlan], raw_dir: Path, labelled: bool,
                extra: dict[str, object]) -> CohortResult:
    """Generate ``plans`` into ``raw_dir`` (atomically; :func:`generate_cohort` and
    :mod:`meddiff.data.cohort_drops` write through it): imaging, masks, FHIR NDJSON (Condition only when
    ``labelled``), notes and ``cohort.json`` (provenance, plus the ``extra`` keys)."""
    started = time.perf_counter()
    config = params.cohort
    n_files = n_observations = n_notes = 0
    lesions: list[dict[str, float | str]] = []
    with atomic_dir(raw_dir) as staging:
        for sub in ("imaging", "masks", "ehr", "notes"):
            (staging / sub).mkdir()
        tasks = ((plan, params, staging) for plan in plans)
        workers = _worker_count(config, len(plans))
        progress = tqdm(total=len(plans), desc="cohort", unit="patient", disable=not sys.stderr.isatty())
        with (
            open(staging / "ehr" / "Patient.ndjson", "w") as patients,
            open(staging / "ehr" / "Observation.ndjson", "w") as observations,
            open(staging / "ehr" / "Condition.ndjson", "w") if labelled else nullcontext() as conditions,
        ):
            if workers > 1:
                pool = multiprocessing.get_context("fork").Pool(workers)
                outputs = pool.imap(_generate_patient, tasks, chunksize=4)
            else:
                pool = None
                outputs = map(_generate_patient, tasks)
            try:
                for output in outputs:  # in patient order: the NDJSON files are deterministic
                    for handle, lines in ((patients, output.patient_lines),
                                          (observations, output.observation_lines),
                                          (conditions, output.condition_lines)):
                        if handle is None:
                            continue
                        for line in lines:
                            handle.write(line + "\n")
                    n_files += output.n_dicom_files
                    n_observations += len(output.observation_lines)
                    n_notes += int(output.has_note)
                    if output.lesion is not None:
                        lesions.append(output.lesion)
                    progress.update()
            finally:
                progress.close()
                if pool is not None:
                    pool.close()
                    pool.join()
        class_counts = {name: sum(p.diagnosis == name for p in plans) for name in params.dataset.class_names}
        site_counts = {site: sum(p.site == site for p in plans) for site in (MAIN_SITE, MINORITY_SITE)}
        faults = {p.patient_id: p.fault for p in plans if p.fault}
        write_json(staging / COHORT_FILE, {
            "generator": "meddiff.data.cohort",
            "seed": params.seed,
            "cohort_params": cohort_provenance(params),
            "n_patients": len(plans),
            "class_counts": class_counts,
            "site_counts": site_counts,
            "faults": [
                {"patient_id": pid, "fault": fault, "record_kind": FAULT_REASONS[fault][0],
                 "expected_reason": FAULT_REASONS[fault][1]}
                for pid, fault in faults.items()
            ],
            # per patient with a lesion mask: its contrast to the surrounding brain (HU, before scanner
            # effects); explanations are scored on the visible ones (issue 10: contrast >= 10 HU)
            "lesions": lesions,
            **extra,
        })
    seconds = time.perf_counter() - started
    LOG.info("cohort: %d patients, %d DICOM files in %s (%.1f s)", len(plans), n_files, raw_dir, seconds)
    return CohortResult(
        raw_dir=raw_dir, n_patients=len(plans), n_dicom_files=n_files, n_observations=n_observations,
        n_notes=n_notes, class_counts=class_counts, site_counts=site_counts, faults=faults,
        seconds=round(seconds, 2),
    )
