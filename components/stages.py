"""One Kubeflow Pipelines (v2) component per stage: thin shells over :func:`meddiff.stages.run_stage`.

Each component is a *lightweight* Python component whose ``base_image`` is the project image, which
already holds ``meddiff`` and ``kfp`` (see ``docker/``): nothing is pip-installed at run time
(``install_kfp_package=False``, no ``packages_to_install``).

Lightweight components are serialized from their function *source*, so every body below is one
self-contained library call, :func:`meddiff.stages.run_component` (train:
:func:`meddiff_components.trainjob_run.run_train`, which is ``run_component`` on one GPU and a Kubeflow
Trainer TrainJob on more), which does everything else:

* parameters travel as one string, ``params_json`` (the validated :class:`meddiff.config.Params` as
  JSON), re-validated in the component;
* ``ingest`` reads the drop named by the pipeline parameter ``raw_uri`` (``s3://``, ``dvc://``), or, when it
  is "", the ``raw`` artifact of ``cohort`` (an optional input), and returns the content hash of what it
  read as its output parameter ``data_version`` (:mod:`meddiff.data.drop`);
* every later task receives that ``data_version``, exports it as ``$MEDDIFF_DATA_VERSION`` before the
  stage runs (MLflow tags) and returns it with the result, so every task records which data it ran on;
* data travels as KFP artifacts: each artifact's ``path`` is handed to the stage as the *folder* of the
  port of the same name in :data:`meddiff.stage_table.STAGES` (``raw`` → ``raw_dir``); the artifact
  types are the ports' kinds (a test checks every signature against the table);
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
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output, OutputPath
from kfp.dsl.python_component import PythonComponent

import meddiff
from meddiff.stage_table import PIPELINE_STAGES, STAGES

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
# Component functions: one per pipeline stage, each body one library call (shipped as source text).
# --------------------------------------------------------------------------------------------------


def cohort(params_json: str, raw: Output[Dataset]) -> dict:
    """Write the built-in synthetic cohort (DICOM, NIfTI masks, FHIR R4, notes) into ``raw``."""
    from meddiff.stages import run_component

    return run_component("cohort", params_json, raw=raw)


def ingest(
    params_json: str,
    interim: Output[Dataset],
    quarantine: Output[Dataset],
    report: Output[Artifact],
    data_version: OutputPath(str),
    raw: Input[Dataset] = None,
    raw_uri: str = "",
) -> dict:
    """Read the drop ``raw_uri`` (``s3://bucket/prefix``, ``dvc://<repo>?path=…&rev=…``) or, when it is "",
    the ``raw`` artifact; de-identify and validate it; accepted records go to ``interim``, rejected ones to
    ``quarantine``; ``report`` holds ``validation.json``; ``data_version`` receives the content hash of
    the drop read."""
    from meddiff.stages import run_component

    return run_component(
        "ingest", params_json, uri=raw_uri, version_output=data_version, raw=raw, interim=interim,
        quarantine=quarantine, report=report,
    )


def preprocess(
    params_json: str, interim: Input[Dataset], processed: Output[Dataset], report: Output[Artifact],
    data_version: str = "",
) -> dict:
    """MONAI transforms, note tokenizer, tabular scaling and stratified splits into ``processed``;
    ``report`` holds the data card."""
    from meddiff.stages import run_component

    return run_component("preprocess", params_json, data_version, interim=interim, processed=processed, report=report)


def train(params_json: str, processed: Input[Dataset], model: Output[Model], data_version: str = "") -> dict:
    """Train the multimodal diffusion model into ``model`` (weights, spec, ``run.json``).

    The stage logs to MLflow at ``$MLFLOW_TRACKING_URI`` when the pod has it (set by the pipeline at
    compile time or from the ``pipeline.credentials_secret`` Secret), else at ``tracking.tracking_uri``.
    With ``train.nodes × train.gpus_per_node > 1`` the task submits a Kubeflow Trainer TrainJob and follows
    it (:mod:`meddiff_components.trainjob_run`); with one GPU it is :func:`meddiff.stages.run_component`.
    """
    from meddiff_components.trainjob_run import run_train

    return run_train(params_json, data_version, processed=processed, model=model)


def evaluate(
    params_json: str,
    processed: Input[Dataset],
    model: Input[Model],
    report: Output[Artifact],
    metrics: Output[Metrics],
    data_version: str = "",
) -> dict:
    """Evaluate on the test split and under modality masking; ``report`` holds ``metrics.json``,
    ``robustness.csv`` and plots; every finite number of ``metrics.json`` is also logged to ``metrics``
    under its dotted key (``test.auc_macro.value``), so the KFP UI shows it."""
    from meddiff.stages import run_component

    return run_component(
        "evaluate", params_json, data_version, metrics=metrics, processed=processed, model=model, report=report
    )


def promote(
    params_json: str,
    processed: Input[Dataset],
    model: Input[Model],
    evaluation: Input[Artifact],
    explanation: Input[Artifact],
    data_card: Input[Artifact],
    report: Output[Artifact],
    data_version: str = "",
) -> dict:
    """The registry gate: alias ``champion`` moves to the evaluated version only if it beats the current
    champion on the same test split; ``report`` holds ``decision.json`` and the model card, filled from
    ``evaluation``, ``explanation`` (the explain report) and ``data_card`` (the preprocess report)."""
    from meddiff.stages import run_component

    return run_component(
        "promote", params_json, data_version, processed=processed, model=model, evaluation=evaluation,
        explanation=explanation, data_card=data_card, report=report,
    )


def generate(
    params_json: str,
    processed: Input[Dataset],
    model: Input[Model],
    synthetic: Output[Dataset],
    report: Output[Artifact],
    data_version: str = "",
) -> dict:
    """Sample class-conditional synthetic patients into ``synthetic``; ``report`` holds their quality
    metrics."""
    from meddiff.stages import run_component

    return run_component(
        "generate", params_json, data_version, processed=processed, model=model, synthetic=synthetic, report=report
    )


def explain(
    params_json: str, processed: Input[Dataset], model: Input[Model], report: Output[Artifact], html: Output[HTML],
    data_version: str = "",
) -> dict:
    """Attributions, localisation and faithfulness scores and the HTML report, into ``report``; the
    report page (``index.html``) is also the task's ``html`` artifact, shown by the KFP UI."""
    from meddiff.stages import run_component

    return run_component(
        "explain", params_json, data_version, html=html, processed=processed, model=model, report=report
    )


#: Component function per pipeline stage, in pipeline order.
STAGE_FUNCTIONS: dict[str, Callable[..., dict]] = {
    name: function
    for name, function in (
        ("cohort", cohort), ("ingest", ingest), ("preprocess", preprocess), ("train", train),
        ("evaluate", evaluate), ("generate", generate), ("explain", explain), ("promote", promote),
    )
}
if tuple(STAGE_FUNCTIONS) != PIPELINE_STAGES:
    raise ImportError(f"components {list(STAGE_FUNCTIONS)} do not match the stage table {list(PIPELINE_STAGES)}")


def build_component(stage: str, image: str) -> PythonComponent:
    """The lightweight component for ``stage`` running in ``image``, with no run-time pip install."""
    if stage not in STAGE_FUNCTIONS:
        raise KeyError(f"no component for stage {stage!r}; stages are {list(STAGE_FUNCTIONS)}")
    return dsl.component(STAGE_FUNCTIONS[stage], base_image=image, install_kfp_package=False)


def build_components(image: str | None = None, gpu_image: str | None = None) -> dict[str, PythonComponent]:
    """Every pipeline stage's component, keyed by stage name in pipeline order.

    ``image`` defaults to :func:`default_image`; stages that need a GPU (``resources.gpus`` in the stage
    table) use ``gpu_image``, which defaults to :func:`default_gpu_image`.
    """
    cpu = image or default_image()
    gpu = gpu_image or default_gpu_image(image)
    return {stage: build_component(stage, gpu if STAGES[stage].gpus else cpu) for stage in STAGE_FUNCTIONS}
