"""One Kubeflow Pipelines (v2) component per stage: thin shells over :func:`meddiff.stages.run_stage`.

Each component is a *lightweight* Python component whose ``base_image`` is the project image, which
already holds ``meddiff`` and ``kfp`` (see ``docker/``): nothing is pip-installed at run time
(``install_kfp_package=False``, no ``packages_to_install``).

Lightweight components are serialized from their function *source*, so every body below is
self-contained: it imports what it needs inside the function, and holds no logic beyond turning KFP
inputs into a :func:`meddiff.stages.run_stage` call. How they meet:

* parameters travel as one string, ``params_json`` (the validated :class:`meddiff.config.Params` as
  JSON), re-validated in the component with :func:`meddiff.config.params_from_dict`;
* ``data_version`` (the DVC data version, a git rev) is exported as ``$MEDDIFF_DATA_VERSION`` before the
  stage runs and returned with the result, so every task records which data it ran on;
* data travels as KFP artifacts: each ``Output[...]`` artifact's ``path`` is handed to the stage as a
  *directory* (the stage creates it) and each ``Input[...]`` artifact's ``path`` is read as one. The
  artifact names are the stage's path arguments without ``_dir`` (``raw`` → ``raw_dir``);
* each component returns the stage result (counts, metrics, paths) plus ``data_version`` as a dict, its
  ``Output`` parameter.

The functions are plain functions; :func:`build_components` turns them into components for a given
image, so the image is chosen when the pipeline is compiled, not when this module is imported.

No ``from __future__ import annotations`` here: KFP reads the annotations (``Output[Dataset]``) at
decoration time and must see the real types, not strings.
"""

import os
from collections.abc import Callable

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output
from kfp.dsl.python_component import PythonComponent

import meddiff

#: Registry the default images are published to (see docs/kubeflow.md).
IMAGE_REPOSITORY = "ghcr.io/meddiff/meddiff"
#: Environment variable read at compile time: the image every stage runs in.
IMAGE_ENV = "MEDDIFF_IMAGE"
#: Environment variable read at compile time: the CUDA image the GPU stage (train) runs in.
GPU_IMAGE_ENV = "MEDDIFF_GPU_IMAGE"


def default_image() -> str:
    """The CPU stage image: ``$MEDDIFF_IMAGE``, else ``ghcr.io/meddiff/meddiff:<package version>``."""
    return os.environ.get(IMAGE_ENV) or f"{IMAGE_REPOSITORY}:{meddiff.__version__}"


def default_gpu_image(image: str | None = None) -> str:
    """The CUDA image for the training stage.

    ``$MEDDIFF_GPU_IMAGE`` if set; else, when an explicit ``image`` was chosen (``--image`` or
    ``$MEDDIFF_IMAGE``), that same image, so one explicit choice is never silently split in two;
    else the versioned CUDA tag ``ghcr.io/meddiff/meddiff:<version>-cuda`` (``docker/Dockerfile.cuda``).
    """
    if os.environ.get(GPU_IMAGE_ENV):
        return os.environ[GPU_IMAGE_ENV]
    explicit = image or os.environ.get(IMAGE_ENV)
    return explicit or f"{IMAGE_REPOSITORY}:{meddiff.__version__}-cuda"


# --------------------------------------------------------------------------------------------------
# Component functions. Self-contained bodies: they are shipped to the cluster as source text.
# --------------------------------------------------------------------------------------------------


def cohort(params_json: str, raw: Output[Dataset], data_version: str = "") -> dict:
    """Write the built-in synthetic cohort (DICOM, NIfTI masks, FHIR R4, notes) into ``raw``."""
    import json
    import os

    from meddiff.config import params_from_dict
    from meddiff.stages import result_to_dict, run_stage

    if data_version:  # the DVC data version this run reads, for the stage's MLflow tags and logs
        os.environ["MEDDIFF_DATA_VERSION"] = data_version
    params = params_from_dict(json.loads(params_json), source="params_json")
    result = run_stage("cohort", params, raw_dir=raw.path)
    return {**json.loads(json.dumps(result_to_dict(result), default=str)), "data_version": data_version}


def ingest(
    params_json: str,
    raw: Input[Dataset],
    interim: Output[Dataset],
    quarantine: Output[Dataset],
    report: Output[Artifact],
    data_version: str = "",
) -> dict:
    """Read, de-identify and validate ``raw``; accepted records go to ``interim``, rejected ones to
    ``quarantine``; ``report`` holds ``validation.json``."""
    import json
    import os

    from meddiff.config import params_from_dict
    from meddiff.stages import result_to_dict, run_stage

    if data_version:  # the DVC data version this run reads, for the stage's MLflow tags and logs
        os.environ["MEDDIFF_DATA_VERSION"] = data_version
    params = params_from_dict(json.loads(params_json), source="params_json")
    result = run_stage(
        "ingest",
        params,
        raw_dir=raw.path,
        interim_dir=interim.path,
        quarantine_dir=quarantine.path,
        report_dir=report.path,
    )
    return {**json.loads(json.dumps(result_to_dict(result), default=str)), "data_version": data_version}


def preprocess(
    params_json: str,
    interim: Input[Dataset],
    processed: Output[Dataset],
    report: Output[Artifact],
    data_version: str = "",
) -> dict:
    """MONAI transforms, note tokenizer, tabular scaling and stratified splits into ``processed``;
    ``report`` holds the data card."""
    import json
    import os

    from meddiff.config import params_from_dict
    from meddiff.stages import result_to_dict, run_stage

    if data_version:  # the DVC data version this run reads, for the stage's MLflow tags and logs
        os.environ["MEDDIFF_DATA_VERSION"] = data_version
    params = params_from_dict(json.loads(params_json), source="params_json")
    result = run_stage(
        "preprocess", params, interim_dir=interim.path, processed_dir=processed.path, report_dir=report.path
    )
    return {**json.loads(json.dumps(result_to_dict(result), default=str)), "data_version": data_version}


def train(params_json: str, processed: Input[Dataset], model: Output[Model], data_version: str = "") -> dict:
    """Train the multimodal diffusion model into ``model`` (checkpoint + ``run.json``).

    The stage logs to MLflow at ``$MLFLOW_TRACKING_URI`` when the pod has it (set by the pipeline at
    compile time or from the ``pipeline.credentials_secret`` Secret), else at ``tracking.tracking_uri``.
    """
    import json
    import os

    from meddiff.config import params_from_dict
    from meddiff.stages import result_to_dict, run_stage

    if data_version:  # the DVC data version this run reads, for the stage's MLflow tags and logs
        os.environ["MEDDIFF_DATA_VERSION"] = data_version
    params = params_from_dict(json.loads(params_json), source="params_json")
    result = run_stage("train", params, processed_dir=processed.path, model_dir=model.path)
    return {**json.loads(json.dumps(result_to_dict(result), default=str)), "data_version": data_version}


def evaluate(
    params_json: str,
    processed: Input[Dataset],
    model: Input[Model],
    report: Output[Artifact],
    metrics: Output[Metrics],
    data_version: str = "",
) -> dict:
    """Evaluate on the test split and under modality masking; ``report`` holds ``metrics.json``,
    ``robustness.csv`` and plots. Every finite numeric leaf of ``metrics.json`` is also logged to
    ``metrics`` under its dotted key (``test.auc_macro``), so the KFP UI shows it."""
    import json
    import math
    import os
    from pathlib import Path

    from meddiff.config import params_from_dict
    from meddiff.stages import result_to_dict, run_stage

    if data_version:  # the DVC data version this run reads, for the stage's MLflow tags and logs
        os.environ["MEDDIFF_DATA_VERSION"] = data_version
    params = params_from_dict(json.loads(params_json), source="params_json")
    result = run_stage("evaluate", params, processed_dir=processed.path, model_dir=model.path, report_dir=report.path)

    metrics_file = Path(report.path) / "metrics.json"
    if not metrics_file.is_file():
        raise FileNotFoundError(f"{metrics_file}: the evaluate stage must write metrics.json to its report_dir")

    def numeric_leaves(node: object, prefix: str) -> list[tuple[str, float]]:
        if isinstance(node, dict):
            items = [(f"{prefix}{key}", value) for key, value in node.items()]
        elif isinstance(node, list):
            items = [(f"{prefix}{index}", value) for index, value in enumerate(node)]
        elif isinstance(node, int | float) and not isinstance(node, bool) and math.isfinite(node):
            return [(prefix.rstrip("."), float(node))]
        else:
            return []
        leaves = []
        for key, value in items:
            leaves.extend(numeric_leaves(value, f"{key}."))
        return leaves

    for key, value in numeric_leaves(json.loads(metrics_file.read_text()), ""):
        metrics.log_metric(key, value)
    return {**json.loads(json.dumps(result_to_dict(result), default=str)), "data_version": data_version}


def generate(
    params_json: str,
    processed: Input[Dataset],
    model: Input[Model],
    synthetic: Output[Dataset],
    report: Output[Artifact],
    data_version: str = "",
) -> dict:
    """Sample class-conditional synthetic patients into ``synthetic`` (DICOM, FHIR, notes);
    ``report`` holds their quality and privacy metrics."""
    import json
    import os

    from meddiff.config import params_from_dict
    from meddiff.stages import result_to_dict, run_stage

    if data_version:  # the DVC data version this run reads, for the stage's MLflow tags and logs
        os.environ["MEDDIFF_DATA_VERSION"] = data_version
    params = params_from_dict(json.loads(params_json), source="params_json")
    result = run_stage(
        "generate",
        params,
        processed_dir=processed.path,
        model_dir=model.path,
        synthetic_dir=synthetic.path,
        report_dir=report.path,
    )
    return {**json.loads(json.dumps(result_to_dict(result), default=str)), "data_version": data_version}


def explain(
    params_json: str,
    processed: Input[Dataset],
    model: Input[Model],
    report: Output[Artifact],
    data_version: str = "",
) -> dict:
    """Attention attributions, Dice against lesion masks and the HTML report, into ``report``."""
    import json
    import os

    from meddiff.config import params_from_dict
    from meddiff.stages import result_to_dict, run_stage

    if data_version:  # the DVC data version this run reads, for the stage's MLflow tags and logs
        os.environ["MEDDIFF_DATA_VERSION"] = data_version
    params = params_from_dict(json.loads(params_json), source="params_json")
    result = run_stage("explain", params, processed_dir=processed.path, model_dir=model.path, report_dir=report.path)
    return {**json.loads(json.dumps(result_to_dict(result), default=str)), "data_version": data_version}


#: Component function per stage, in pipeline order (the keys are :data:`meddiff.stages.STAGES`).
STAGE_FUNCTIONS: dict[str, Callable[..., dict]] = {
    "cohort": cohort,
    "ingest": ingest,
    "preprocess": preprocess,
    "train": train,
    "evaluate": evaluate,
    "generate": generate,
    "explain": explain,
}

#: Stages that run in the CUDA image (and request a GPU in the pipeline).
GPU_STAGES: frozenset[str] = frozenset({"train"})


def build_component(stage: str, image: str) -> PythonComponent:
    """The lightweight component for ``stage`` running in ``image``, with no run-time pip install."""
    if stage not in STAGE_FUNCTIONS:
        raise KeyError(f"no component for stage {stage!r}; stages are {list(STAGE_FUNCTIONS)}")
    return dsl.component(STAGE_FUNCTIONS[stage], base_image=image, install_kfp_package=False)


def build_components(image: str | None = None, gpu_image: str | None = None) -> dict[str, PythonComponent]:
    """Every stage's component, keyed by stage name in pipeline order.

    ``image`` defaults to :func:`default_image`; the stages in :data:`GPU_STAGES` use ``gpu_image``,
    which defaults to :func:`default_gpu_image`.
    """
    cpu = image or default_image()
    gpu = gpu_image or default_gpu_image(image)
    return {stage: build_component(stage, gpu if stage in GPU_STAGES else cpu) for stage in STAGE_FUNCTIONS}
