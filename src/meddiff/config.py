"""Typed parameters loaded from ``params.yaml``, validated at load.

Every stage reads its section of one :class:`Params` object. Unknown keys are errors (a typo in
``params.yaml`` must never be silently ignored) and every error names the dotted key that is wrong.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from meddiff.errors import UserError
from meddiff.stage_table import STAGES

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
    #: the labelled external-validation drop (`meddiff external_drop` writes one) and, admitted in apply mode
    #: by `meddiff external`, its interim/quarantine/processed folders
    external: Path = Path("data/raw_external")
    external_processed: Path = Path("data/external")


class CohortConfig(_Section):
    """The built-in synthetic head-CT cohort (``meddiff cohort``), see ``docs/data.md``. Its patients have the
    classes of ``dataset.classes`` (each written as the class's first ICD-10 code) at ``class_prevalence``."""

    n_patients: PositiveInt = 400
    #: share of each class of ``dataset.classes``, in that order (checked when the cohort is generated)
    class_prevalence: list[PositiveFloat] = [0.45, 0.28, 0.23, 0.04]
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


class ClassSpec(_Section):
    """One diagnosis class of the dataset (``dataset.classes.<name>``)."""

    #: ICD-10 codes or code prefixes mapped onto the class (FHIR Condition.code, MIMIC ``diagnoses_icd.icd_code``;
    #: dots ignored, the longest match over all classes wins). The first is the class's own code wherever meddiff
    #: writes a diagnosis: the built-in cohort's and generated patients' Conditions, RiskAssessment outcomes.
    icd10: Annotated[list[str], Field(min_length=1)]

    @field_validator("icd10")
    @classmethod
    def _codes_look_like_icd10(cls, value: list[str]) -> list[str]:
        for code in value:
            if not ICD10_PATTERN.fullmatch(code.strip()):
                raise ValueError(f"{code!r} is not an ICD-10 code or prefix (a letter, two digits, then ., digits)")
        return value


class FeatureSpec(_Section):
    """One numeric EHR feature of the dataset (``dataset.features.<name>``), harmonised to one unit."""

    #: UCUM unit every value is converted to (meddiff.data.fhir.harmonise; a value in another unit without a
    #: known conversion is quarantined ``unknown_unit``)
    unit: str
    #: accepted physiological range [low, high] in ``unit``; a value outside is quarantined ``out_of_range``
    range: tuple[float, float]
    #: LOINC codes read as this feature (FHIR Observation.code.coding)
    loinc: list[str] = []
    #: MIMIC-IV ``hosp.d_labitems`` itemids read as this feature (``ehr/labevents.csv``)
    mimic_itemids: list[int] = []

    @model_validator(mode="after")
    def _readable_and_ordered(self) -> FeatureSpec:
        if not self.loinc and not self.mimic_itemids:
            raise ValueError("needs at least one LOINC code or MIMIC itemid (nothing would be read as it)")
        low, high = self.range
        if low >= high:
            raise ValueError(f"range must have low < high, got [{low}, {high}]")
        return self


#: ICD-10 code or prefix: chapter letter, two digits, optionally a dot and up to 4 more characters
ICD10_PATTERN = re.compile(r"[A-Za-z][0-9]{2}(\.?[0-9A-Za-z]{0,4})?")

_DEFAULT_CLASSES: dict[str, ClassSpec] = {
    "healthy": ClassSpec(icd10=["Z03.89"]),  # observation for suspected condition, ruled out
    "ischemic_stroke": ClassSpec(icd10=["I63.9", "I63"]),
    "intracerebral_hemorrhage": ClassSpec(icd10=["I61.9", "I61"]),
    "brain_abscess": ClassSpec(icd10=["G06.0"]),
}
_DEFAULT_FEATURES: dict[str, FeatureSpec] = {
    "wbc": FeatureSpec(unit="10*3/uL", range=(0.5, 60.0), loinc=["6690-2"], mimic_itemids=[51301, 51300]),
    "crp": FeatureSpec(unit="mg/L", range=(0.0, 500.0), loinc=["1988-5"], mimic_itemids=[50889]),
    "glucose": FeatureSpec(unit="mmol/L", range=(1.0, 45.0), loinc=["2345-7", "14749-6"], mimic_itemids=[50931]),
    "systolic_bp": FeatureSpec(unit="mm[Hg]", range=(50.0, 260.0), loinc=["8480-6"]),
    "inr": FeatureSpec(unit="{INR}", range=(0.5, 10.0), loinc=["6301-6"], mimic_itemids=[51237]),
    "temperature": FeatureSpec(unit="Cel", range=(30.0, 44.0), loinc=["8310-5"]),
}


class DatasetConfig(_Section):
    """What the data are: diagnosis classes, numeric EHR features and modalities (docs/data.md, "Bring your own
    dataset"). The one place they are declared: the cohort generator, ingest, preprocess, the model and the
    FHIR writers all read them from here. Defaults: the built-in head-CT cohort."""

    #: class name -> its codes, in the model's class order (at least two)
    classes: dict[str, ClassSpec] = _DEFAULT_CLASSES
    #: canonical feature name -> unit, range and codes, in the model's feature order (age and sex are added)
    features: dict[str, FeatureSpec] = _DEFAULT_FEATURES
    #: the modalities the data have; the model neither builds, runs, masks nor imputes any other
    modalities: Annotated[list[Literal["image", "text", "tabular"]], Field(min_length=1)] = ["image", "text", "tabular"]

    @model_validator(mode="after")
    def _consistent(self) -> DatasetConfig:
        if len(self.classes) < 2:
            raise ValueError(f"classes: at least two classes are needed, got {list(self.classes)}")
        if len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities: listed twice in {self.modalities}")
        for kind, groups in (
            ("ICD-10 code", {name: [_bare_icd10(c) for c in spec.icd10] for name, spec in self.classes.items()}),
            ("LOINC code", {name: spec.loinc for name, spec in self.features.items()}),
            ("MIMIC itemid", {name: spec.mimic_itemids for name, spec in self.features.items()}),
        ):
            section = "classes" if kind == "ICD-10 code" else "features"
            owner: dict[Any, str] = {}
            for name, codes in groups.items():
                for code in codes:
                    if code in owner:
                        raise ValueError(f"{section}.{name}: {kind} {code} is mapped to {owner[code]!r} already")
                    owner[code] = name
        return self

    @property
    def class_names(self) -> list[str]:
        """The class names in the model's order."""
        return list(self.classes)

    @property
    def icd10_to_class(self) -> dict[str, str]:
        """ICD-10 code or prefix -> class (meddiff.data.fhir.icd10_class matches the longest prefix)."""
        return {code: name for name, spec in self.classes.items() for code in spec.icd10}

    @property
    def class_icd10(self) -> dict[str, str]:
        """Class -> its own ICD-10 code (the first listed), the code written for a patient of that class."""
        return {name: spec.icd10[0] for name, spec in self.classes.items()}

    @property
    def feature_names(self) -> list[str]:
        return list(self.features)

    @property
    def feature_units(self) -> dict[str, str]:
        return {name: spec.unit for name, spec in self.features.items()}

    @property
    def feature_ranges(self) -> dict[str, tuple[float, float]]:
        return {name: spec.range for name, spec in self.features.items()}

    @property
    def feature_by_loinc(self) -> dict[str, str]:
        return {code: name for name, spec in self.features.items() for code in spec.loinc}

    @property
    def feature_by_itemid(self) -> dict[int, str]:
        return {item: name for name, spec in self.features.items() for item in spec.mimic_itemids}


def _bare_icd10(code: str) -> str:
    """``i63.9`` and ``I639`` are one code (as meddiff.data.fhir.icd10_class compares them)."""
    return code.replace(".", "").strip().upper()


class IngestConfig(_Section):
    """Reading, validating and quarantining raw records (``meddiff ingest``)."""

    #: the raw drop to read instead of ``paths.raw`` (the built-in cohort): ``s3://bucket/prefix``,
    #: ``dvc://<repo>?path=<path>&rev=<rev>`` or a folder (meddiff.data.drop); "" reads ``paths.raw``
    raw_uri: str = ""
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
    #: acquisition site recorded for patients read from ``ehr/patients.csv`` (MIMIC has no site column)
    mimic_site: str = "mimic_iv"

    @field_validator("reference_date")
    @classmethod
    def _iso_date(cls, value: str) -> str:
        import datetime

        try:
            datetime.date.fromisoformat(value)
        except ValueError:
            raise ValueError(f"reference_date must be an ISO date YYYY-MM-DD, got {value!r}") from None
        return value


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
    #: image latent pooling (model/encoders.py): max over brain cells, or `lesion` (also the cells weighted by
    #: the predicted lesion and its statistics; needs train.lambda_seg > 0)
    image_pooling: Literal["max", "lesion"] = "max"
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


class DiffusionDPConfig(_Section):
    """DP-SGD of the latent-diffusion refinement (opacus; ``meddiff.training.latent_diffusion``): per-patient
    gradients clipped to ``max_grad_norm``, Gaussian noise of ``noise_multiplier`` × that norm, Poisson-sampled
    batches; ``target_epsilon``, when set, replaces ``noise_multiplier`` by the noise that reaches it. ``delta``
    null = 1 / (training patients)."""

    enabled: bool = False
    noise_multiplier: PositiveFloat = 1.0
    target_epsilon: PositiveFloat | None = None
    max_grad_norm: PositiveFloat = 1.0
    delta: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None


class DiffusionConfig(_Section):
    num_train_timesteps: PositiveInt = 200
    schedule: Literal["linear_beta", "scaled_linear_beta", "sigmoid_beta"] = "linear_beta"
    beta_start: PositiveFloat = 1e-4
    beta_end: PositiveFloat = 0.02
    unet_channels: list[PositiveInt] = [16, 32]
    class_dropout_p: Fraction = 0.1
    impute_missing_latents: bool = False
    imputation_steps: PositiveInt = 20
    refine_epochs: Annotated[int, Field(ge=0)] = 400
    refine_learning_rate: PositiveFloat = 1e-3
    refine_batch_size: PositiveInt = 32
    #: AdamW weight decay of the refinement (0.01 = torch's default)
    refine_weight_decay: Annotated[float, Field(ge=0.0)] = 0.01
    dp: DiffusionDPConfig = DiffusionDPConfig()


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
    #: weight of the auxiliary lesion segmentation loss (BCE + soft Dice on training masks); 0: no seg head
    lambda_seg: Annotated[float, Field(ge=0.0)] = 0.0
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

    @model_validator(mode="after")
    def _lesion_pooling_has_segmentation(self) -> TrainConfig:
        if self.model.image_pooling == "lesion" and self.lambda_seg == 0.0:
            raise ValueError("train.model.image_pooling 'lesion' is driven by the lesion segmentation head: "
                             "set train.lambda_seg > 0")
        return self


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
    #: latent-diffusion refinement epochs of every suite model (null = train.diffusion.refine_epochs); the
    #: suite decides classification claims, the generation claims come from the model of `make run`
    suite_refine_epochs: Annotated[int, Field(ge=0)] | None = 25
    #: `meddiff external`: the labelled drop to validate on (s3://…, dvc://… or a folder); "" = paths.external
    external_uri: str = ""


class PromoteConfig(_Section):
    """The registry gate (``promote`` stage): alias ``champion`` moves only to a better version."""

    #: false: the stage records the candidate's score and leaves the aliases alone
    enabled: bool = True


class GenerateConfig(_Section):
    n_per_class: PositiveInt = 24
    num_inference_steps: PositiveInt = 50
    guidance_scale: Annotated[float, Field(ge=0.0)] = 4.0
    #: resamples of the test patients for the TSTR / train-on-real AUC intervals
    n_bootstrap: PositiveInt = 500
    #: closest synthetic→training pairs listed in the privacy report, per space
    n_closest_pairs: PositiveInt = 5
    #: quality sets (validation-split size, training prevalence) the Fréchet distances and precision/recall average
    n_quality_draws: PositiveInt = 5
    #: k of the k-NN manifolds of precision/recall (Kynkäänniemi et al. 2019 use 3)
    precision_recall_k: PositiveInt = 3
    #: a 2-D TorchScript feature network (e.g. RadImageNet) for a second 2.5-D FID; never downloaded; null = none
    fid_checkpoint: str | None = None
    #: classes the rare-class augmentation measure adds synthetic patients of; null = training prevalence ≤ 5 %
    rare_classes: list[str] | None = None


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
        "external": 3600,
    }
    #: 6-field cron (seconds minutes hours day-of-month month day-of-week) of `pipeline schedule`
    schedule_cron: str = "0 0 3 * * 1"
    #: Kubeflow Trainer runtime of multi-GPU training (train.nodes × train.gpus_per_node > 1)
    training_runtime: str = "torch-distributed"
    #: PersistentVolumeClaim (ReadWriteMany) shared by the train task and its TrainJob: data, checkpoints, model
    shared_volume: str = "meddiff-training"
    #: where that claim is mounted; a relative paths.checkpoints resolves under it
    shared_volume_path: str = "/mnt/meddiff"
    #: ingest tasks run side by side (dsl.ParallelFor over `ingest --shard i/n`, then one merge); 1 = one task
    ingest_shards: PositiveInt = 1
    #: preprocess tasks run side by side (dsl.ParallelFor over `preprocess --shard i/n`, then `--merge`); 1 = one
    preprocess_shards: PositiveInt = 1

    @field_validator("timeouts")
    @classmethod
    def _timeouts_name_stages(cls, value: dict[str, int]) -> dict[str, int]:
        unknown = sorted(set(value) - set(STAGES))
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; stages are {list(STAGES)}")
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
    dataset: DatasetConfig = DatasetConfig()
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
