"""Typed parameters loaded from ``params.yaml``, validated at load.

Every stage reads its section of one :class:`Params` object. Unknown keys are errors (a typo in
``params.yaml`` must never be silently ignored) and every error names the dotted key that is wrong.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from meddiff.errors import UserError
from meddiff.stage_table import PIPELINE_STAGES

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]


class ParamsError(UserError, ValueError):
    """A ``params.yaml`` that does not validate; the message names each bad key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsConfig(_Section):
    raw: Path = Path("data/raw")
    interim: Path = Path("data/interim")
    quarantine: Path = Path("data/quarantine")
    processed: Path = Path("data/processed")
    models: Path = Path("models")
    synthetic: Path = Path("data/synthetic")
    reports: Path = Path("reports")
    checkpoints: Path = Path("checkpoints")
    #: the raw drop of new (unlabelled) patients that `meddiff predict` scores (`meddiff new_patients` writes one)
    new_patients: Path = Path("data/raw_new")


class CohortConfig(_Section):
    """The built-in synthetic head-CT cohort (``meddiff cohort``), see ``docs/data.md``."""

    n_patients: PositiveInt = 400
    classes: list[str] = ["healthy", "ischemic_stroke", "intracerebral_hemorrhage", "brain_abscess"]
    class_prevalence: list[PositiveFloat] = [0.45, 0.28, 0.23, 0.04]
    #: class -> ICD-10 code written as the FHIR R4 Condition.code of every patient of that class
    condition_icd10: dict[str, str] = {
        "healthy": "Z03.89",
        "ischemic_stroke": "I63.9",
        "intracerebral_hemorrhage": "I61.9",
        "brain_abscess": "G06.0",
    }
    volume_shape: tuple[PositiveInt, PositiveInt, PositiveInt] = (24, 48, 48)
    pixel_spacing_mm: PositiveFloat = 4.0
    slice_thickness_mm: PositiveFloat = 6.0
    noise_hu: Annotated[float, Field(ge=0.0)] = 4.0
    minority_site_fraction: Fraction = 0.12
    minority_slice_thickness_mm: PositiveFloat = 8.0
    minority_intensity_scale: PositiveFloat = 1.08
    minority_intensity_offset_hu: float = 6.0
    minority_noise_hu: Annotated[float, Field(ge=0.0)] = 9.0
    image_missing_fraction: Fraction = 0.03
    note_missing_fraction: Fraction = 0.06
    labs_missing_fraction: Fraction = 0.04
    lab_missing_fraction: Fraction = 0.08
    lab_alternative_unit_fraction: Fraction = 0.25
    corrupt_fraction: Fraction = 0.03
    num_workers: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _prevalence_matches_classes(self) -> CohortConfig:
        if len(self.classes) != len(self.class_prevalence):
            raise ValueError(
                f"class_prevalence has {len(self.class_prevalence)} entries but classes has "
                f"{len(self.classes)}"
            )
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be unique, got {self.classes}")
        if len(self.classes) < 2:
            raise ValueError("at least two classes are needed")
        if set(self.condition_icd10) != set(self.classes):
            raise ValueError(
                f"condition_icd10 must map exactly the classes {self.classes}, got {sorted(self.condition_icd10)}"
            )
        return self


class DropConfig(_Section):
    """A raw drop of other patients the cohort generator writes in the cohort's layout (the ``drops`` section):
    own seed and size, own share of missing modalities and of the minority site (1.0 = every patient from the
    other scanner profile, a site shift); classes, prevalence and anatomy as ``cohort``."""

    seed: int
    n_patients: PositiveInt
    #: patient ids are these letters + a number; two or more letters, so never the training cohort's ``P…``
    id_prefix: Annotated[str, Field(pattern=r"^[A-Z]{2,4}$")]
    #: false: no Condition resources (new patients to predict for; diagnoses only in cohort.json)
    labelled: bool
    image_missing_fraction: Fraction
    note_missing_fraction: Fraction
    labs_missing_fraction: Fraction
    minority_site_fraction: Fraction
    #: patients whose Patient record is malformed (ingest quarantines them with a reason)
    malformed_patients: Annotated[int, Field(ge=0)] = 0


class DropsConfig(_Section):
    """Drops written beside the training cohort (``docs/data.md``)."""

    #: `meddiff new_patients` → `paths.new_patients`, scored by `meddiff predict` at the end of `make run`
    new_patients: DropConfig = DropConfig(
        seed=1042, n_patients=24, id_prefix="NEW", labelled=False, image_missing_fraction=0.25,
        note_missing_fraction=0.25, labs_missing_fraction=0.25, minority_site_fraction=0.12, malformed_patients=1,
    )
    #: external validation (issue 11): another seed, large enough for >= 60 rare-class and >= 200 minority-site
    #: patients at the cohort's prevalence (``meddiff.data.cohort.generate_external_drop``)
    external: DropConfig = DropConfig(
        seed=2042, n_patients=2000, id_prefix="EXT", labelled=True, image_missing_fraction=0.03,
        note_missing_fraction=0.06, labs_missing_fraction=0.04, minority_site_fraction=0.12,
    )


class MonitorConfig(_Section):
    """Drift of a new drop against the training data and the retraining decision (``meddiff monitor``,
    :mod:`meddiff.monitoring`)."""

    #: a feature group drifted when at least this share of its features drift (evidently's dataset drift)
    drift_share: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    #: groups whose drift is a reason to retrain (ehr, note, image, latent); the others are only reported
    decide_on: list[Literal["ehr", "note", "image", "latent"]] = ["ehr", "note", "image", "latent"]
    #: this many newly labelled patients is a reason to retrain on its own
    min_new_labelled: PositiveInt = 100
    #: principal components of each modality's latent compared (fitted on the training patients)
    latent_components: PositiveInt = 3


class PredictConfig(_Section):
    """Batch prediction for new patients (``meddiff predict``), see ``docs/data.md``."""

    #: the model: ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` in the registry, or a local model
    #: folder written by `meddiff train`; null = ``models:/<tracking.registered_model>@champion``
    model_uri: str | None = None
    #: the drop of new patients to read instead of ``paths.new_patients`` (``s3://bucket/prefix`` or
    #: ``dvc://…``, as ``ingest.raw_uri``); "" = the folder
    new_patients_uri: str = ""


#: canonical lab name -> (LOINC codes accepted for it, canonical UCUM unit)
_DEFAULT_LABS: dict[str, tuple[list[str], str]] = {
    "wbc": (["6690-2"], "10*3/uL"),
    "crp": (["1988-5"], "mg/L"),
    "glucose": (["2345-7", "14749-6"], "mmol/L"),
    "systolic_bp": (["8480-6"], "mm[Hg]"),
    "inr": (["6301-6"], "{INR}"),
    "temperature": (["8310-5"], "Cel"),
}


class IngestConfig(_Section):
    """Reading, validating and quarantining raw records (``meddiff ingest``)."""

    #: the raw drop to read instead of ``paths.raw`` (the built-in cohort): ``s3://bucket/prefix``,
    #: ``dvc://<repo>?path=<path>&rev=<rev>`` or a folder (meddiff.data.drop); "" reads ``paths.raw``
    raw_uri: str = ""
    #: canonical lab -> LOINC codes mapped onto it (FHIR R4 Observation.code.coding)
    lab_loinc: dict[str, list[str]] = {name: codes for name, (codes, _) in _DEFAULT_LABS.items()}
    #: canonical lab -> UCUM unit every value is harmonised to
    lab_units: dict[str, str] = {name: unit for name, (_, unit) in _DEFAULT_LABS.items()}
    lab_ranges: dict[str, tuple[float, float]] = {
        "wbc": (0.5, 60.0),
        "crp": (0.0, 500.0),
        "glucose": (1.0, 45.0),
        "systolic_bp": (50.0, 260.0),
        "inr": (0.5, 10.0),
        "temperature": (30.0, 44.0),
    }
    #: ICD-10 code (or code prefix, matched longest first) -> diagnosis class
    icd10_to_class: dict[str, str] = {
        "Z03.89": "healthy",
        "I63": "ischemic_stroke",
        "I61": "intracerebral_hemorrhage",
        "G06.0": "brain_abscess",
    }
    age_range: tuple[int, int] = (0, 120)
    min_note_chars: Annotated[int, Field(ge=0)] = 20
    #: the date ages are computed at (ISO 8601); fixed so that ingest is reproducible
    reference_date: str = "2024-06-30"
    #: warnings logged one by one up to this many quarantined records, then summarised
    max_logged_warnings: Annotated[int, Field(ge=0)] = 25
    #: worker processes for DICOM header reading and series assembly; 0 = one per core (at most 8)
    num_workers: Annotated[int, Field(ge=0)] = 0
    #: environment variable holding the secret key of the keyed hash (HMAC-SHA256) that pseudonymises
    #: patient ids, replaces UIDs and picks each patient's date shift. The key is never in code or params.
    deid_key_env: str = "MEDDIFF_DEID_KEY"
    #: when the key variable is unset, derive a key from ``raw_dir/cohort.json`` -- only for a raw drop
    #: written by ``meddiff cohort`` (synthetic data); any other drop still fails without a key
    allow_ephemeral_key_for_synthetic: bool = False
    #: dates kept in de-identified DICOM headers are shifted back by 1..max days (per patient, keyed)
    deid_max_date_shift_days: Annotated[int, Field(ge=1)] = 365
    #: ages above this are reported as this value (HIPAA Safe Harbor aggregates ages over 89)
    deid_max_age: Annotated[int, Field(ge=1)] = 90
    #: DICOM Modality (0008,0060) values read as images; when a patient has several, the first listed wins
    accepted_modalities: Annotated[list[Literal["CT", "MR"]], Field(min_length=1)] = ["CT", "MR"]
    #: BraTS layout ``imaging/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz``: the channel used as the image
    brats_channel: Literal["t1", "t1ce", "t2", "flair"] = "flair"
    #: MIMIC-IV style CSV (``ehr/labevents.csv``): itemid -> canonical lab (hosp module ``d_labitems``)
    mimic_lab_itemids: dict[str, list[int]] = {
        "wbc": [51301, 51300],  # White Blood Cells / WBC Count (Hematology, Blood), K/uL
        "crp": [50889],         # C-Reactive Protein (Chemistry, Blood), mg/L
        "glucose": [50931],     # Glucose (Chemistry, Blood), mg/dL
        "inr": [51237],         # INR(PT) (Hematology, Blood), no unit
    }
    #: acquisition site recorded for patients read from ``ehr/patients.csv`` (MIMIC has no site column)
    mimic_site: str = "mimic_iv"

    @field_validator("lab_ranges")
    @classmethod
    def _ranges_ordered(cls, value: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        for lab, (low, high) in value.items():
            if low >= high:
                raise ValueError(f"range for {lab!r} must have low < high, got [{low}, {high}]")
        return value

    @field_validator("reference_date")
    @classmethod
    def _iso_date(cls, value: str) -> str:
        import datetime

        try:
            datetime.date.fromisoformat(value)
        except ValueError:
            raise ValueError(f"reference_date must be an ISO date YYYY-MM-DD, got {value!r}") from None
        return value

    @model_validator(mode="after")
    def _labs_consistent(self) -> IngestConfig:
        names = set(self.lab_loinc)
        for key in ("lab_units", "lab_ranges"):
            other = set(getattr(self, key))
            if other != names:
                raise ValueError(f"{key} must cover exactly the labs of lab_loinc {sorted(names)}, got {sorted(other)}")
        codes = [code for group in self.lab_loinc.values() for code in group]
        if len(codes) != len(set(codes)):
            raise ValueError("a LOINC code is mapped to more than one lab in lab_loinc")
        unknown = sorted(set(self.mimic_lab_itemids) - names)
        if unknown:
            raise ValueError(f"mimic_lab_itemids maps to {unknown}, not labs of lab_loinc {sorted(names)}")
        itemids = [item for group in self.mimic_lab_itemids.values() for item in group]
        if len(itemids) != len(set(itemids)):
            raise ValueError("an itemid is mapped to more than one lab in mimic_lab_itemids")
        return self


class PreprocessConfig(_Section):
    """MONAI image transforms, note tokenizer, tabular scaling and splits (``meddiff preprocess``)."""

    #: the crop around the brain centroid (RAS voxels; the image encoder needs multiples of 4)
    spatial_size: tuple[PositiveInt, PositiveInt, PositiveInt] = (36, 44, 24)
    #: the main site's native grid: a 6 mm isotropic grid lost the 3-5 mm bleeds (test AUC 0.76 → 0.72)
    pixdim_mm: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = (4.0, 4.0, 6.0)
    #: the brain-window channel: calibrated HU scaled to [0, 1] (blood up to ~80 HU, CSF from ~0)
    hu_window: tuple[float, float] = (0.0, 80.0)
    #: bone for the skull strip: well above any brain tissue or blood (≤ ~100 HU), below cortical bone
    skull_hu: float = 250.0
    #: calibration target of the stripped brain's median HU (the main site's median)
    reference_brain_hu: float = 32.0
    #: hyperdense channel: ramp 0 → 1 over these HU (healthy brain's p99 is ~46-50 HU; blood 45-80)
    hyperdense_ramp_hu: tuple[float, float] = (40.0, 60.0)
    #: its smoothing (voxels): small, so 3-5 mm bleeds survive it
    hyperdense_sigma_voxels: Annotated[float, Field(ge=0.0)] = 0.5
    #: hypodense channel: ramp 0 → 1 from normal white matter (~28 HU) down to an infarct's ~16 HU
    hypodense_ramp_hu: tuple[float, float] = (28.0, 16.0)
    #: below this (smoothed HU) the voxel is CSF, not an infarct: the hypodense channel is zero there
    hypodense_floor_hu: float = 12.0
    #: CSF-like channel: ramp 0 → 1 from 14 HU down to 6 HU (CSF ~5 HU)
    csf_ramp_hu: tuple[float, float] = (14.0, 6.0)
    #: smoothing (voxels) of the hypodense and CSF channels: noise (4-9 HU sd) is as large as a faint infarct
    density_sigma_voxels: Annotated[float, Field(ge=0.0)] = 1.0
    max_note_tokens: Annotated[int, Field(ge=3)] = 48
    vocab_size: Annotated[int, Field(ge=8)] = 600
    val_fraction: Annotated[float, Field(gt=0.0, lt=0.5)] = 0.15
    test_fraction: Annotated[float, Field(gt=0.0, lt=0.5)] = 0.20
    #: MONAI PersistentDataset cache of transformed images, keyed by file content and transform
    #: params (later runs skip the transforms); null = no cache
    cache_dir: Path | None = Path("data/cache/monai")
    #: a ``tokenizers`` tokenizer.json to use instead of fitting one on the training notes; null = fit
    pretrained_tokenizer: Path | None = None

    @field_validator("hu_window")
    @classmethod
    def _window_ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[0] >= value[1]:
            raise ValueError(f"hu_window must be [low, high] with low < high, got {list(value)}")
        return value

    @field_validator("hyperdense_ramp_hu", "hypodense_ramp_hu", "csf_ramp_hu")
    @classmethod
    def _ramp_has_width(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[0] == value[1]:
            raise ValueError(f"a density ramp needs two different ends (HU where it is 0, then 1), got {list(value)}")
        return value

    @model_validator(mode="after")
    def _fractions_leave_train(self) -> PreprocessConfig:
        if self.val_fraction + self.test_fraction >= 0.8:
            raise ValueError("val_fraction + test_fraction must leave at least 20 % for training")
        return self


class ModelConfig(_Section):
    d_model: PositiveInt = 64
    n_heads: PositiveInt = 4
    image_channels: list[PositiveInt] = [8, 16, 32]
    #: dropout on the image latent (the max-pooled brain features): the CNN overfits ~250 training scans
    image_latent_dropout: Fraction = 0.3
    text_layers: PositiveInt = 2
    text_heads: PositiveInt = 2
    tabular_hidden: PositiveInt = 64
    dropout: Fraction = 0.1
    ontology_attention: bool = True
    ontology_prior_init: float = 1.0
    fusion: Literal["cross_attention", "concat"] = "cross_attention"

    @model_validator(mode="after")
    def _shapes_fit(self) -> ModelConfig:
        side = round(self.d_model**0.5)
        if side * side != self.d_model:
            raise ValueError(f"d_model must be a perfect square (latent laid out as a map), got {self.d_model}")
        if self.d_model % self.n_heads or self.d_model % self.text_heads:
            raise ValueError("d_model must be divisible by n_heads and text_heads")
        return self


class DiffusionConfig(_Section):
    num_train_timesteps: PositiveInt = 200
    schedule: Literal["linear_beta", "scaled_linear_beta", "sigmoid_beta"] = "linear_beta"
    beta_start: PositiveFloat = 1e-4
    beta_end: PositiveFloat = 0.02
    unet_channels: list[PositiveInt] = [16, 32]
    class_dropout_p: Fraction = 0.1
    impute_missing_latents: bool = False
    imputation_steps: PositiveInt = 20
    refine_epochs: Annotated[int, Field(ge=0)] = 25
    refine_learning_rate: PositiveFloat = 1e-3
    refine_batch_size: PositiveInt = 64


class TrainConfig(_Section):
    epochs: PositiveInt = 30
    batch_size: PositiveInt = 16
    learning_rate: PositiveFloat = 2e-3
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.01
    grad_clip_norm: PositiveFloat = 1.0
    lr_warmup_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    modalities: list[Literal["image", "text", "tabular"]] = ["image", "text", "tabular"]
    modality_dropout_p: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5
    lambda_diff: Annotated[float, Field(ge=0.0)] = 1.0
    lambda_cls: Annotated[float, Field(ge=0.0)] = 1.0
    lambda_recon: Annotated[float, Field(ge=0.0)] = 0.5
    class_weighting: bool = True
    #: L_cls class weights ∝ (1 / class frequency) ** power (1 = inverse frequency, 0.5 = its square root)
    class_weight_power: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    #: learning rate of the image encoder = learning_rate × this (the CNN may need another step size)
    image_lr_multiplier: PositiveFloat = 1.0
    latent_stop_gradient: bool = True
    masking_curriculum: Literal["constant", "linear_warmup"] = "constant"
    masking_warmup_epochs: Annotated[int, Field(ge=0)] = 5
    early_stopping_patience: PositiveInt = 8
    #: image augmentation (training/augmentation.py): flip probability per axis, and the largest shift
    augment_flip_p: Fraction = 0.5
    augment_max_shift_voxels: Annotated[int, Field(ge=0)] = 2
    checkpoint_every_steps: PositiveInt = 50
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = True
    num_threads: Annotated[int, Field(ge=0)] = 0
    #: training nodes (pods); nodes × gpus_per_node > 1 trains as a Kubeflow Trainer TrainJob (docs/kubeflow.md)
    nodes: PositiveInt = 1
    #: GPUs (DDP processes) per node
    gpus_per_node: PositiveInt = 1
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()


class EvaluateConfig(_Section):
    masking_rates: list[Fraction] = [0.0, 0.2, 0.4, 0.6, 0.8]
    n_repeats: PositiveInt = 3
    n_bootstrap: PositiveInt = 500
    rare_classes: list[str] | None = None
    subgroup_site: str | None = None
    suite: list[str] = [
        "full", "no_masking", "classifier_only", "no_ontology", "no_imputation", "knn_imputation",
        "image_only", "text_only", "tabular_only", "late_fusion", "diffmic", "feature_lr",
    ]
    suite_epochs: PositiveInt | None = 5
    #: every suite model is trained with seeds ``seed``, ``seed`` + 1, … (this many)
    suite_seeds: PositiveInt = 3


class PromoteConfig(_Section):
    """The registry gate (``promote`` stage): alias ``champion`` moves only to a better version."""

    #: false: the stage records the candidate's score and leaves the aliases alone
    enabled: bool = True


class GenerateConfig(_Section):
    n_per_class: PositiveInt = 24
    num_inference_steps: PositiveInt = 50
    guidance_scale: Annotated[float, Field(ge=0.0)] = 2.0
    #: resamples of the test patients for the TSTR / train-on-real AUC intervals
    n_bootstrap: PositiveInt = 500
    #: closest synthetic→training pairs listed in the privacy report, per space
    n_closest_pairs: PositiveInt = 5


ExplainMethod = Literal["attention", "grad_attention", "integrated_gradients", "grad_cam", "occlusion"]


class ExplainConfig(_Section):
    """Attributions, their localisation and faithfulness scores, and the report (``meddiff explain``,
    proposal §3.5-3.6; see ``src/meddiff/explain/``)."""

    n_patients: PositiveInt = 40
    #: healthy test patients explained too (reported apart: what a map shows with nothing to find)
    n_healthy: Annotated[int, Field(ge=0)] = 10
    #: occlusion is left out by default: ~6 s per patient on 2 CPU cores (the make-run budget)
    methods: list[ExplainMethod] = ["grad_attention", "integrated_gradients", "grad_cam"]
    method: ExplainMethod = "integrated_gradients"
    attribution_threshold: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    pointing_tolerance_voxels: Annotated[int, Field(ge=0)] = 1
    visible_contrast_hu: float = 10.0
    ig_steps: PositiveInt = 16
    occlusion_mask_voxels: PositiveInt = 6
    occlusion_overlap: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    grad_cam_layer: str = ""
    deletion_fractions: list[Fraction] = [0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
    n_bootstrap: PositiveInt = 500
    n_figures: Annotated[int, Field(ge=0)] = 8

    @model_validator(mode="after")
    def _shown_method_is_run(self) -> ExplainConfig:
        if self.method not in self.methods:
            raise ValueError(f"method {self.method!r} (shown in the report) must be one of methods {self.methods}")
        fractions = self.deletion_fractions
        if len(fractions) < 2 or fractions[0] != 0.0 or fractions != sorted(set(fractions)):
            raise ValueError(f"deletion_fractions must start at 0 and increase, got {fractions}")
        return self


class TrackingConfig(_Section):
    tracking_uri: str = "sqlite:///mlruns.db"
    artifact_location: str = "mlartifacts"
    experiment: str = "meddiff"
    registered_model: str = "meddiff-diagnosis"




class PipelineConfig(_Section):
    """Kubeflow Pipelines settings (``meddiff pipeline compile | submit | schedule | run``), see
    ``docs/kubeflow.md``. Platform settings, not hyperparameters: they never reach a stage."""

    #: KFP experiment runs and recurring runs are filed under (created if missing)
    experiment: str = "meddiff"
    #: multi-user KFP: the profile namespace; "" for a standalone (single-user) install
    namespace: str = ""
    #: Kubernetes service account the runs use (infra/runner); "" = the KFP default (pipeline-runner)
    service_account: str = "meddiff-pipeline-runner"
    #: Secret whose keys (S3 and MLflow credentials) become environment variables of every task
    credentials_secret: str = "meddiff-credentials"
    #: ConfigMap (endpoints, no credentials) whose MLFLOW_TRACKING_URI every task reads; "" = none
    config_map: str = "meddiff-config"
    #: node labels the training pod must match (the GPU pool)
    gpu_node_selector: dict[str, str] = {"nvidia.com/gpu.present": "true"}
    #: KFP caching for the train task (the other stages are deterministic and always cached)
    cache_training: bool = False
    #: pod deadline per task in seconds (Kubernetes activeDeadlineSeconds)
    timeouts: dict[str, PositiveInt] = {
        "cohort": 1800,
        "ingest": 3600,
        "preprocess": 3600,
        "train": 21600,
        "evaluate": 3600,
        "promote": 1800,
        "generate": 3600,
        "explain": 3600,
    }
    #: 6-field cron (seconds minutes hours day-of-month month day-of-week) of `pipeline schedule`
    schedule_cron: str = "0 0 3 * * 1"
    #: Kubeflow Trainer runtime of multi-GPU training (train.nodes × train.gpus_per_node > 1)
    training_runtime: str = "torch-distributed"
    #: PersistentVolumeClaim (ReadWriteMany) shared by the train task and its TrainJob: data, checkpoints, model
    shared_volume: str = "meddiff-training"
    #: where that claim is mounted; a relative paths.checkpoints resolves under it
    shared_volume_path: str = "/mnt/meddiff"

    @field_validator("timeouts")
    @classmethod
    def _timeouts_name_stages(cls, value: dict[str, int]) -> dict[str, int]:
        unknown = sorted(set(value) - set(PIPELINE_STAGES))
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; stages are {list(PIPELINE_STAGES)}")
        return value

    @field_validator("schedule_cron")
    @classmethod
    def _six_field_cron(cls, value: str) -> str:
        fields = value.split()
        if len(fields) != 6:
            raise ValueError(
                f"must be a 6-field cron (seconds minutes hours day-of-month month day-of-week, "
                f"e.g. '0 0 3 * * 1'), got {len(fields)} field(s): {value!r}"
            )
        return value


class Params(_Section):
    """The whole ``params.yaml``."""

    seed: int = 42
    paths: PathsConfig = PathsConfig()
    cohort: CohortConfig = CohortConfig()
    drops: DropsConfig = DropsConfig()
    ingest: IngestConfig = IngestConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    promote: PromoteConfig = PromoteConfig()
    generate: GenerateConfig = GenerateConfig()
    explain: ExplainConfig = ExplainConfig()
    predict: PredictConfig = PredictConfig()
    monitor: MonitorConfig = MonitorConfig()
    tracking: TrackingConfig = TrackingConfig()
    pipeline: PipelineConfig = PipelineConfig()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def digest(self) -> str:
        """A short content hash, used to tag MLflow runs."""
        canonical = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(canonical).hexdigest()[:12]


def _format_errors(source: str, error: ValidationError) -> str:
    lines = [f"{source}: invalid parameters"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "<root>"
        lines.append(f"  {key}: {item['msg']}")
    return "\n".join(lines)


def params_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Params:
    """Validate a parsed params mapping; raise :class:`ParamsError` naming each bad key."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ParamsError(_format_errors(source, error)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Load and validate ``params.yaml``."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {error}") from None
    return params_from_dict(raw, source=str(path))


def apply_overrides(params: Params, overrides: list[str]) -> Params:
    """Return params with ``dotted.key=value`` overrides applied (values parsed as YAML)."""
    raw = params.to_dict()
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key:
            raise ParamsError(f"override {override!r}: expected KEY=VALUE, e.g. train.epochs=5")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ParamsError(f"override {override!r}: {part!r} is not a section of params")
            node = node[part]
        if parts[-1] not in node:
            raise ParamsError(f"override {override!r}: unknown key {key!r}")
        node[parts[-1]] = yaml.safe_load(value)
    return params_from_dict(raw, source="overrides")
