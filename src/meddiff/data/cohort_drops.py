"""Raw drops beside the training cohort, in its layout and from its generator (``params.drops``).

* ``new_patients`` (the ``new_patients`` stage, ``paths.new_patients``): a small drop of *new* patients for
  ``meddiff predict``: another seed, more modalities missing, one malformed patient, no Condition resources
  (the diagnoses are kept only in ``cohort.json`` ``ground_truth``, for tests);
* ``external``: a large labelled drop for external validation (issue 11), optionally from the minority
  site's scanner profile only (``minority_site_fraction: 1.0``).

Both go through :func:`meddiff.data.cohort.write_drop`, as the training cohort does; they live in their own
module so that the ``cohort`` stage does not depend on the ``drops`` params.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from meddiff.config import DropConfig, Params
from meddiff.data.cohort import CohortResult, plan_cohort, write_drop

#: the ``cohort`` keys a drop (``params.drops``) sets for itself
DROP_COHORT_KEYS: tuple[str, ...] = ("n_patients", "image_missing_fraction", "note_missing_fraction",
                                     "labs_missing_fraction", "minority_site_fraction")
#: the fault of a drop's malformed patient: its Patient record fails validation, so the whole patient is quarantined
MALFORMED_PATIENT_FAULT = "implausible_birth_date"


def drop_params(params: Params, drop: DropConfig) -> Params:
    """``params`` with the cohort of ``drop``: its seed, size, missing modalities and sites, no injected faults
    beyond its malformed patients; everything else (classes, prevalence, anatomy, scanners) as the cohort."""
    shifted = {name: getattr(drop, name) for name in DROP_COHORT_KEYS}
    cohort = {**params.cohort.model_dump(mode="json"), **shifted, "corrupt_fraction": 0.0}
    return Params.model_validate({**params.to_dict(), "seed": drop.seed, "cohort": cohort})


def generate_drop(params: Params, drop: DropConfig, raw_dir: Path) -> CohortResult:
    """Write a raw drop of other patients beside the cohort (``params.drops``), in the cohort's layout.

    The patients come from ``drop.seed`` (ids ``drop.id_prefix`` + number, so they never share an id with
    the training cohort), the first ``drop.malformed_patients`` non-rare ones with an implausible birth date
    (ingest quarantines their Patient as ``out_of_range``, the rest of their records as ``orphan_record``).
    An unlabelled drop (``drop.labelled`` false: new patients to predict for) has no Condition resources;
    its diagnoses are kept only in ``cohort.json`` ``ground_truth``, for tests. ``raw_dir`` is replaced
    atomically.
    """
    shifted = drop_params(params, drop)
    plans = plan_cohort(shifted.cohort, shifted.dataset.class_names, shifted.seed, drop.id_prefix)
    rare = shifted.dataset.class_names[int(np.argmin(shifted.cohort.class_prevalence))]
    malformed = [p.index for p in plans if p.diagnosis != rare][: drop.malformed_patients]
    plans = [replace(p, fault=MALFORMED_PATIENT_FAULT) if p.index in malformed else p for p in plans]
    extra: dict[str, object] = {"drop": drop.model_dump(mode="json"), "labelled": drop.labelled}
    if not drop.labelled:
        extra["ground_truth"] = [{"patient_id": p.patient_id, "diagnosis": p.diagnosis} for p in plans]
    return write_drop(shifted, plans, Path(raw_dir), labelled=drop.labelled, extra=extra)


def generate_new_patients(params: Params, new_patients_dir: Path) -> CohortResult:
    """The ``new_patients`` stage: the small unlabelled drop of ``params.drops.new_patients`` that
    ``meddiff predict`` scores after every ``make run``."""
    return generate_drop(params, params.drops.new_patients, new_patients_dir)


def generate_external_drop(params: Params, external_dir: Path) -> CohortResult:
    """The labelled external-validation drop of ``params.drops.external`` (issue 11)."""
    return generate_drop(params, params.drops.external, external_dir)
