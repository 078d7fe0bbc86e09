"""Write a small MIMIC-IV-style EHR-only drop: the worked example of docs/data.md, "Bring your own dataset".

The layout is MIMIC-IV's ``hosp`` module (https://mimic.mit.edu/docs/iv/modules/hosp/), as ingest reads it
(``meddiff.data.ehr_csv``)::

    <out>/ehr/patients.csv        subject_id, gender, anchor_age, anchor_year
    <out>/ehr/labevents.csv       labevent_id, subject_id, hadm_id, itemid, charttime, valuenum, valueuom
    <out>/ehr/diagnoses_icd.csv   subject_id, hadm_id, seq_num, icd_code (no dot), icd_version

One site, no images, no notes, two classes: type 2 diabetes (ICD-10 E11) against prediabetes (R73.03), from
four labs that are not the built-in cohort's (HbA1c, glucose, triglycerides, creatinine; MIMIC-IV
``d_labitems`` itemids in ``examples/byo_ehr/params.yaml``). The values are drawn, per class, from normal
distributions that overlap (a synthetic stand-in of the same shape as a real extract: no real patient). Like a
real extract it has what ingest must quarantine: labs nothing maps (hematocrit), diagnoses of neither class
(hypertension I10) and ICD-9 rows.

Usage: ``python examples/byo_ehr/make_drop.py OUT [--patients N] [--seed S] [--unlabelled]`` (deterministic for
N and S). ``--unlabelled`` writes no ``diagnoses_icd.csv``: new patients for ``meddiff predict``.
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import numpy as np

#: class -> (share of the patients, ICD-10 code as MIMIC writes it: no dot)
CLASSES: dict[str, tuple[float, str]] = {"type2_diabetes": (0.4, "E119"), "prediabetes": (0.6, "R7303")}
#: lab -> (MIMIC-IV itemid, unit as MIMIC writes it, mean and sd per class in CLASSES order)
LABS: dict[str, tuple[int, str, tuple[tuple[float, float], tuple[float, float]]]] = {
    "hba1c": (50852, "%", ((7.6, 1.2), (6.0, 0.3))),
    "glucose": (50931, "mg/dL", ((165.0, 45.0), (112.0, 15.0))),
    "triglycerides": (51000, "mg/dL", ((190.0, 70.0), (150.0, 55.0))),
    "creatinine": (50912, "mg/dL", ((1.15, 0.35), (0.95, 0.25))),
}
#: a lab the params map to nothing (hematocrit, %): ingest quarantines it as unknown_code
UNMAPPED_ITEMID = 51221
#: a diagnosis of neither class (essential hypertension): quarantined as unknown_code, the patient kept
OTHER_ICD10 = "I10"
#: share of lab values left out (not measured)
MISSING_LAB_FRACTION = 0.1
FIRST_SUBJECT_ID = 10_000_000
ANCHOR_YEAR = 2150  # MIMIC shifts years into the future


def write_drop(out: Path, n_patients: int, seed: int, labelled: bool = True) -> dict[str, int]:
    """Write the drop into ``out/ehr`` (without ``diagnoses_icd.csv`` unless ``labelled``); return the number of
    patients per class."""
    rng = np.random.default_rng(seed)
    names = list(CLASSES)
    shares = np.array([share for share, _ in CLASSES.values()])
    labels = rng.choice(len(names), size=n_patients, p=shares / shares.sum())
    ehr = Path(out) / "ehr"
    ehr.mkdir(parents=True, exist_ok=True)
    diagnoses_path = ehr / "diagnoses_icd.csv" if labelled else Path(os.devnull)
    with (open(ehr / "patients.csv", "w", newline="") as patients_file,
          open(ehr / "labevents.csv", "w", newline="") as labs_file,
          open(diagnoses_path, "w", newline="") as diagnoses_file):
        patients = csv.writer(patients_file)
        labs = csv.writer(labs_file)
        diagnoses = csv.writer(diagnoses_file)
        patients.writerow(["subject_id", "gender", "anchor_age", "anchor_year"])
        labs.writerow(["labevent_id", "subject_id", "hadm_id", "itemid", "charttime", "valuenum", "valueuom"])
        diagnoses.writerow(["subject_id", "hadm_id", "seq_num", "icd_code", "icd_version"])
        labevent_id = 1
        for index, label in enumerate(labels.tolist()):
            subject, hadm = FIRST_SUBJECT_ID + index, 20_000_000 + index
            age = int(np.clip(rng.normal(58.0 if label == 0 else 50.0, 12.0), 18, 91))
            patients.writerow([subject, "M" if rng.random() < 0.5 else "F", age, ANCHOR_YEAR])
            charttime = f"{ANCHOR_YEAR}-03-{1 + index % 28:02d} 08:{index % 60:02d}:00"
            for itemid, unit, moments in LABS.values():
                if rng.random() < MISSING_LAB_FRACTION:
                    continue
                mean, sd = moments[label]
                value = round(max(float(rng.normal(mean, sd)), 0.05), 2)
                labs.writerow([labevent_id, subject, hadm, itemid, charttime, value, unit])
                labevent_id += 1
            if index % 7 == 0:
                labs.writerow([labevent_id, subject, hadm, UNMAPPED_ITEMID, charttime, 41.0, "%"])
                labevent_id += 1
            diagnoses.writerow([subject, hadm, 1, CLASSES[names[label]][1], 10])
            if index % 5 == 0:
                diagnoses.writerow([subject, hadm, 2, OTHER_ICD10, 10])
            if index % 11 == 0:
                diagnoses.writerow([subject, hadm, 3, "4019", 9])  # ICD-9 essential hypertension: not mapped
    return {name: int((labels == i).sum()) for i, name in enumerate(names)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the drop's folder (ehr/ is written inside)")
    parser.add_argument("--patients", type=int, default=200, help="number of patients (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--unlabelled", action="store_true", help="no diagnoses: new patients to predict for")
    args = parser.parse_args()
    counts = write_drop(args.out, args.patients, args.seed, labelled=not args.unlabelled)
    print(f"wrote {args.out / 'ehr'}: {counts}")


if __name__ == "__main__":
    main()
