"""``meddiff ingest``: raw imaging / EHR / notes -> validated, de-identified interim data + quarantine.

Inputs (all optional, mixed freely in one drop; see ``docs/data.md``):

* imaging: DICOM series (single- or multi-frame, native or compressed transfer syntaxes) or NIfTI cases
  in the BraTS layout ``imaging/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz``; ``masks/<patient>.nii.gz``;
* EHR: FHIR R4 NDJSON (``ehr/<Resource>.ndjson``), FHIR Bundles (``ehr/*.json``), MIMIC-IV style CSV
  (``ehr/patients.csv``, ``labevents.csv``, ``diagnoses_icd.csv``);
* notes: ``notes/<patient>.txt`` and FHIR DocumentReference (inline text/plain attachment).

Every input item becomes one record (:mod:`meddiff.data.quarantine`) of a kind: ``image_series``,
``lesion_mask``, ``patient``, ``observation``, ``condition``, ``note`` and stray ``file``. Records are
checked in two layers: structural checks while reading (paths, DICOM geometry, JSON, UTF-8) and
great-expectations suites per table (:mod:`meddiff.data.validation`), which name exactly the failing
rows. A patient enters ``interim_dir/manifest.parquet`` when its Patient record is accepted, it has a
diagnosis label and at least one accepted modality; records of rejected patients are quarantined as
``orphan_record``. One bad record never stops the stage.

Nothing identifying reaches ``interim_dir`` (:mod:`meddiff.data.deid`): patient ids become keyed
pseudonyms (also in file names), UIDs are replaced, DICOM headers kept in ``interim/headers/`` are
de-identified with the PS3.15 Annex E Basic Profile, notes are scrubbed, and only age (capped), sex,
site, labs and the diagnosis are taken from the EHR. Symlinks and unsafe names in the raw tree are
quarantined and never followed.

The modules, in the order :func:`run_ingest` uses them:

* :mod:`~meddiff.data.ingest.inventory`: walk the raw tree, sort files by reader, quarantine unsafe paths;
* :mod:`~meddiff.data.ingest.imaging`: DICOM series (worker pool) and BraTS cases -> interim NIfTI;
* :mod:`~meddiff.data.ingest.ehr`: FHIR NDJSON, Bundles and MIMIC CSV -> EHR records;
* :mod:`~meddiff.data.ingest.tables` and :mod:`~meddiff.data.ingest.notes`: the tables the suites validate;
* :mod:`~meddiff.data.ingest.manifest`: labels, labs, notes, image placement, mask geometry, orphans;
* :mod:`~meddiff.data.ingest.report`: ``validation.json``, ``validation.html`` and the GX results;
* :mod:`~meddiff.data.ingest.run`: the stage itself.
"""

from meddiff.data.ingest.imaging import ingest_dicom
from meddiff.data.ingest.manifest import HEADERS_DIR, MANIFEST_FILE
from meddiff.data.ingest.run import IngestResult, run_ingest

__all__ = ["HEADERS_DIR", "MANIFEST_FILE", "IngestResult", "ingest_dicom", "run_ingest"]
