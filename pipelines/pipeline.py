"""The meddiff Kubeflow Pipelines (v2) pipeline: the stage components chained by their artifacts.

::

    if raw_uri == "":   cohort → ingest → preprocess → train ─┬→ evaluate → promote
                                                              ├→ generate
                                                              ├→ explain
                                                              └→ external (only if external_uri != "")
    else:                        ingest(raw_uri) → …the same…

With ``pipeline.ingest_shards`` = n > 1, ingest is a ``dsl.ParallelFor`` of n ``ingest --shard i/n`` tasks
and a merge task that stands in for ``ingest`` (:mod:`meddiff_pipelines.ingest_shards`); likewise
``pipeline.preprocess_shards`` for preprocess (:mod:`meddiff_pipelines.preprocess_shards`).

The graph is derived from the stage table (:data:`meddiff.stage_table.STAGES`): every stage input is
wired to the output of the earlier stage that carries the same data, so the table is the one place
that says what runs after what, and what each task needs (resources, GPU, retries, caching).

Three pipeline parameters. ``params_json`` carries every hyperparameter: its default is the validated
params (``params.yaml`` plus any ``--set`` overrides) as JSON, so a run started without arguments uses
exactly the params the pipeline was compiled from, and a run can override the whole object.
``raw_uri`` names the team's raw drop (``s3://bucket/prefix`` or ``dvc://<repo>?path=…&rev=…``, see
:mod:`meddiff.data.drop`; default ``ingest.raw_uri`` of the params, "" in ``params.yaml``). The graph
forks on it with ``dsl.If(raw_uri == "")`` / ``dsl.Else``: without a URI the ``cohort`` task writes the
built-in cohort and ingest reads it; with one, ``cohort`` does not run and ingest fetches the drop. The
stages from ingest on are the same tasks in both branches (built by one loop). The fork holds the whole
chain because KFP cannot consume a task inside a ``dsl.If`` from outside it except through
``dsl.OneOf``, which ``kfp.local`` 2.17 cannot run for artifacts ("Expected 1 artifact in
ArtifactSelectorSpec"); one branch runs, so a run still has one task per stage. ``external_uri`` (default
``evaluate.external_uri``, "") names a labelled drop of another hospital or period: when given, the
``external`` task scores the trained model on it (external validation, :mod:`meddiff.evaluation.external`).

``data_version`` is no pipeline parameter: ingest returns the content hash of the drop it read (S3
ETag manifest, DVC md5, or the hash of the cohort's files) as its output ``data_version``, and every
later task exports it as ``$MEDDIFF_DATA_VERSION`` (MLflow run and model version tags) and returns it
with its result. Data moves only through KFP artifacts (see :mod:`meddiff_components.stages`);
``params.paths`` is not used on the cluster.

Platform settings (``params.yaml`` ``pipeline``, plus the stage table): the training task requests
one ``nvidia.com/gpu``, tolerates the GPU pool's ``nvidia.com/gpu:NoSchedule`` taint and must land on
nodes matching ``pipeline.gpu_node_selector``; every task has a pod deadline from
``pipeline.timeouts``; the I/O stages retry with exponential backoff; the deterministic stages are
cached, training only when ``pipeline.cache_training``, the registry gate never; every task may read
credentials from the optional Secret ``pipeline.credentials_secret`` (see ``infra/README.md``) and takes
``MLFLOW_TRACKING_URI`` from the environment the pipeline is compiled in, else from the optional
ConfigMap ``pipeline.config_map``.

No ``from __future__ import annotations``: KFP reads the pipeline function's annotations at
decoration time.
"""

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kfp import compiler, dsl, kubernetes
from meddiff_components.external import build_external_component
from meddiff_components.stages import build_components
from meddiff_components.trainjob import (  # one list for tasks and TrainJob nodes
    CREDENTIAL_KEYS,  # the Secret's keys
    PIPELINE_POD_LABELS,  # what infra/'s NetworkPolicies admit to MLflow and the object store
)
from meddiff_pipelines.ingest_shards import add_ingest_fan_out
from meddiff_pipelines.preprocess_shards import add_preprocess_fan_out
from meddiff_pipelines.trainjob import configure_launcher, launches_trainjob, task_resources

from meddiff.config import Params, PipelineConfig
from meddiff.io import atomic_file
from meddiff.stage_table import PIPELINE_STAGES, STAGES, Caching, Resources, producers

PIPELINE_NAME = "meddiff"
#: display names of the two branches of the fork on ``raw_uri``
COHORT_BRANCH = "built-in cohort (no raw_uri)"
DROP_BRANCH = "raw drop (raw_uri)"
#: display name of the condition around external validation (only with an ``external_uri``)
EXTERNAL_BRANCH = "external validation (external_uri)"
#: the stage that reads the raw drop and computes the data version (the table's ``fetches``)
FETCHING_STAGE = next(name for name in PIPELINE_STAGES if STAGES[name].fetches)
#: the stages before it write what it may fetch instead (the built-in cohort): they run only without a URI
SOURCE_STAGES = PIPELINE_STAGES[: PIPELINE_STAGES.index(FETCHING_STAGE)]
#: the fetching task's output parameter read by every later task
DATA_VERSION_OUTPUT = "data_version"
PIPELINE_DESCRIPTION = (
    "Hierarchical multimodal diffusion for robust, explainable diagnosis: "
    "[cohort →] ingest (raw_uri or the built-in cohort) → preprocess → train → evaluate | generate | explain."
)

#: Default Kubernetes Secret (``pipeline.credentials_secret``) whose keys become environment variables of
#: every task (optional: a missing Secret or key leaves the variable unset). Template: infra/README.md.
CREDENTIALS_SECRET = PipelineConfig().credentials_secret
#: Environment variables copied from the compiling environment into every task when set there.
PASSTHROUGH_ENV: tuple[str, ...] = ("MLFLOW_TRACKING_URI",)
#: Keys of the ConfigMap ``pipeline.config_map`` (optional) mapped to environment variables of every task
#: when the compiling environment does not set them (infra/base/config/configmap.yaml).
CONFIG_MAP_KEYS: tuple[str, ...] = ("MLFLOW_TRACKING_URI",)

GPU_RESOURCE = "nvidia.com/gpu"


@dataclass(frozen=True)
class Retry:
    """``PipelineTask.set_retry`` arguments: retries with exponential backoff."""

    num_retries: int = 3
    backoff_duration: str = "30s"
    backoff_factor: float = 2.0
    backoff_max_duration: str = "600s"


def params_to_json(params: Params) -> str:
    """The validated params as the JSON string the components receive (``params_json``)."""
    return json.dumps(params.to_dict())


def _configure(
    task: dsl.PipelineTask, stage: str, settings: PipelineConfig, resources: Resources | None = None
) -> dsl.PipelineTask:
    """Resources (default: the stage table's), GPU, toleration, node selector, timeout, retries, caching,
    credentials and environment for one stage's task."""
    spec = STAGES[stage]
    resources = resources or spec.resources
    task.set_cpu_request(resources.cpu_request)
    task.set_memory_request(resources.memory_request)
    task.set_memory_limit(resources.memory_limit)
    if resources.gpus:
        task.set_accelerator_type(GPU_RESOURCE)
        task.set_accelerator_limit(resources.gpus)
        kubernetes.add_toleration(task, key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")
        for label, value in settings.gpu_node_selector.items():
            kubernetes.add_node_selector(task, label_key=label, label_value=value)
    if stage in settings.timeouts:
        # KFP v2 has no task timeout of its own; kfp-kubernetes sets the pod's activeDeadlineSeconds.
        kubernetes.set_timeout(task, settings.timeouts[stage])
    caching = {Caching.ALWAYS: True, Caching.WHEN_ASKED: settings.cache_training, Caching.NEVER: False}
    task.set_caching_options(enable_caching=caching[spec.caching])
    if spec.retry:
        retry = Retry()
        task.set_retry(
            num_retries=retry.num_retries,
            backoff_duration=retry.backoff_duration,
            backoff_factor=retry.backoff_factor,
            backoff_max_duration=retry.backoff_max_duration,
        )
    kubernetes.use_secret_as_env(
        task, settings.credentials_secret, {key: key for key in CREDENTIAL_KEYS}, optional=True
    )
    for label, value in PIPELINE_POD_LABELS.items():
        kubernetes.add_pod_label(task, label_key=label, label_value=value)
    from_config_map = {}
    for name in PASSTHROUGH_ENV:
        if os.environ.get(name):
            task.set_env_variable(name, os.environ[name])
        elif name in CONFIG_MAP_KEYS:
            from_config_map[name] = name  # one source per variable: a duplicate env name hides the first
    if settings.config_map and from_config_map:
        kubernetes.use_config_map_as_env(task, settings.config_map, from_config_map, optional=True)
    return task


def add_stage_tasks(
    components: dict, stages: tuple[str, ...], params: Params, params_json: str, uri: str, from_uri: bool,
) -> dict[str, dsl.PipelineTask]:
    """One task per stage of ``stages`` in the current graph context, wired by the table; inputs whose
    producer is absent stay empty. ``uri`` fills the fetching stage's ``raw_uri``; ``from_uri``: the branch
    where it reads ``uri`` (its task is then never cached). Returns the tasks by stage name."""
    uri_parameter = STAGES[FETCHING_STAGE].uri_argument
    sources = producers()
    tasks: dict[str, dsl.PipelineTask] = {}
    for name in stages:
        arguments: dict[str, object] = {"params_json": params_json}
        for port in STAGES[name].inputs:
            producer, output = sources[port.data]
            if producer in tasks:
                arguments[port.artifact] = tasks[producer].outputs[output.artifact]
            elif port.argument != STAGES[name].fetches:
                raise ValueError(f"stage {name!r} reads {port.data!r}, which no task of this branch writes")
        if name == FETCHING_STAGE:
            arguments[uri_parameter] = uri
        elif FETCHING_STAGE in tasks:
            arguments[DATA_VERSION_OUTPUT] = tasks[FETCHING_STAGE].outputs[DATA_VERSION_OUTPUT]
        if name == FETCHING_STAGE and params.pipeline.ingest_shards > 1:  # ParallelFor over shards, then merge

            def configure_fetching(fan_task: dsl.PipelineTask) -> dsl.PipelineTask:
                _configure(fan_task, FETCHING_STAGE, params.pipeline, task_resources(FETCHING_STAGE, params))
                if from_uri:
                    fan_task.set_caching_options(enable_caching=False)
                return fan_task

            tasks[name] = add_ingest_fan_out(components[name], params.pipeline.ingest_shards, arguments, name,
                                             configure_fetching)
            continue
        if name == "preprocess" and params.pipeline.preprocess_shards > 1:  # ParallelFor over shards, then merge

            def configure_preprocess(fan_task: dsl.PipelineTask) -> dsl.PipelineTask:
                return _configure(fan_task, "preprocess", params.pipeline, task_resources("preprocess", params))

            tasks[name] = add_preprocess_fan_out(components[name], params.pipeline.preprocess_shards, arguments,
                                                 name, configure_preprocess)
            continue
        task = components[name](**arguments)
        task.set_display_name(name)  # the second branch's tasks would otherwise show as "ingest-2", …
        tasks[name] = _configure(task, name, params.pipeline, task_resources(name, params))
        if name == FETCHING_STAGE and from_uri:
            # what a URI names may change under it (s3://…/latest next week): always read it again
            task.set_caching_options(enable_caching=False)
        if launches_trainjob(name, params):  # train.nodes × train.gpus_per_node > 1
            configure_launcher(task, components[name], params)
    return tasks


def add_external_validation(
    component: Callable[..., dsl.PipelineTask], tasks: dict[str, dsl.PipelineTask], params: Params, params_json: str,
    external_uri: str,
) -> None:
    """Inside ``dsl.If(external_uri != "")``: the ``external`` task scoring the model trained by ``tasks`` on the
    labelled drop ``external_uri`` (:mod:`meddiff.evaluation.external`)."""
    with dsl.If(external_uri != "", name=EXTERNAL_BRANCH):
        task = component(params_json=params_json, external_uri=external_uri,
                         model=tasks["train"].outputs["model"])
        _configure(task, "external", params.pipeline).set_display_name("external")


def build_pipeline(
    params: Params, image: str | None = None, gpu_image: str | None = None, raw_uri: str | None = None
) -> Callable[..., None]:
    """The ``meddiff`` pipeline for ``params``.

    Args:
        params: validated params; their JSON is the default of the ``params_json`` pipeline parameter,
            and their ``pipeline`` section sets the platform settings of the tasks.
        image: image of every stage; default ``$MEDDIFF_IMAGE`` or the versioned project image.
        gpu_image: image of the GPU stage (train); default ``$MEDDIFF_GPU_IMAGE``, else ``image`` when
            given explicitly, else the versioned ``-cuda`` project image.
        raw_uri: default of the ``raw_uri`` pipeline parameter; default ``params.ingest.raw_uri``.

    Returns:
        The ``@dsl.pipeline`` function (a KFP graph component) named ``meddiff``.
    """
    components = build_components(image, gpu_image)
    default_params_json = params_to_json(params)
    default_raw_uri = params.ingest.raw_uri if raw_uri is None else raw_uri
    uri_parameter = STAGES[FETCHING_STAGE].uri_argument
    if uri_parameter != "raw_uri":  # the pipeline function below spells the parameter out
        raise ValueError(f"stage {FETCHING_STAGE!r} fetches {uri_parameter!r}; the pipeline declares raw_uri")

    external = build_external_component(image)
    default_external_uri = params.evaluate.external_uri

    @dsl.pipeline(name=PIPELINE_NAME, description=PIPELINE_DESCRIPTION)
    def meddiff(params_json: str = default_params_json, raw_uri: str = default_raw_uri,
                external_uri: str = default_external_uri) -> None:
        with dsl.If(raw_uri == "", name=COHORT_BRANCH):
            tasks = add_stage_tasks(components, PIPELINE_STAGES, params, params_json, raw_uri, from_uri=False)
            add_external_validation(external, tasks, params, params_json, external_uri)
        with dsl.Else(name=DROP_BRANCH):
            tasks = add_stage_tasks(components, PIPELINE_STAGES[len(SOURCE_STAGES):], params, params_json, raw_uri,
                                    from_uri=True)
            add_external_validation(external, tasks, params, params_json, external_uri)

    return meddiff


def write_compiled(pipeline: Callable[..., None], output: Path) -> Path:
    """Compile the ``@dsl.pipeline`` function to the IR YAML file ``output``, written atomically.

    The compiler writes into a private temporary folder first; the result then replaces ``output`` in
    one rename, so a failed compile never leaves a truncated pipeline behind.

    Raises:
        ValueError: ``output`` is not a ``.yaml`` / ``.yml`` file.
    """
    output = Path(output)
    if output.suffix not in {".yaml", ".yml"}:
        raise ValueError(f"{output}: the pipeline is written as KFP IR YAML; use a .yaml or .yml name")
    with tempfile.TemporaryDirectory(prefix="meddiff-pipeline-") as staging:
        compiled = Path(staging) / "pipeline.yaml"
        compiler.Compiler().compile(pipeline_func=pipeline, package_path=str(compiled))
        with atomic_file(output) as handle:
            handle.write(compiled.read_text())
    return output


def compile_pipeline(
    params: Params,
    output: Path,
    image: str | None = None,
    gpu_image: str | None = None,
    raw_uri: str | None = None,
) -> Path:
    """Compile the ``meddiff`` pipeline for ``params`` to ``output`` (:func:`write_compiled`)."""
    if Path(output).suffix not in {".yaml", ".yml"}:  # before building: a wrong name fails fast
        raise ValueError(f"{output}: the pipeline is written as KFP IR YAML; use a .yaml or .yml name")
    return write_compiled(build_pipeline(params, image=image, gpu_image=gpu_image, raw_uri=raw_uri), output)
