"""The ``meddiff-retrain`` Kubeflow pipeline: the recurring run that retrains only for a reason.

::

    monitor(raw_uri) ── retrain? ──> ingest(raw_uri) → preprocess → train → evaluate | generate | explain → promote

``monitor`` compares the team's drop (``raw_uri``: ``s3://bucket/prefix`` or ``dvc://…``, e.g. the prefix
their export job refreshes every week) with what the registry's champion was trained on
(:mod:`meddiff.prediction.monitor`: evidently drift per feature group; newly labelled patients) and
outputs ``retrain``. The training chain — the same tasks as the ``meddiff`` pipeline's raw-drop branch,
built by :func:`meddiff_pipelines.pipeline.add_stage_tasks` — runs inside ``dsl.If(retrain == True)``;
otherwise the run ends after ``monitor``, whose ``decision.json`` says why not. The champion still moves
only through ``promote``'s gate. ``meddiff pipeline schedule`` files recurring runs of this pipeline.

No ``from __future__ import annotations``: KFP reads the pipeline function's annotations at decoration time.
"""

from collections.abc import Callable
from pathlib import Path

from kfp import dsl
from meddiff_components.predict import build_predict_components
from meddiff_components.stages import build_components
from meddiff_pipelines.pipeline import (
    FETCHING_STAGE,
    PIPELINE_STAGES,
    SOURCE_STAGES,
    _configure,
    add_stage_tasks,
    params_to_json,
    write_compiled,
)

from meddiff.config import Params
from meddiff.errors import UserError
from meddiff.stage_table import STAGES

RETRAIN_PIPELINE = "meddiff-retrain"
MONITOR_STAGE = "monitor"
#: display name of the conditional training branch
RETRAIN_BRANCH = "retrain (drift or new labels)"
PIPELINE_DESCRIPTION = (
    "Recurring retraining with a reason: monitor the team's drop against the champion's training data "
    "(evidently drift, new labels); only then ingest → preprocess → train → evaluate → promote."
)


def build_retrain_pipeline(
    params: Params, image: str | None = None, gpu_image: str | None = None, raw_uri: str | None = None,
) -> Callable[..., None]:
    """The ``meddiff-retrain`` pipeline: parameters ``params_json`` and ``raw_uri`` (default
    ``ingest.raw_uri``).

    Raises:
        UserError: no ``raw_uri`` (argument or ``ingest.raw_uri``): a recurring run needs the team's drop.
    """
    default_raw_uri = params.ingest.raw_uri if raw_uri is None else raw_uri
    if not default_raw_uri:
        raise UserError("a recurring run retrains on your data: give --raw-uri (s3://bucket/prefix or dvc://…) "
                        "or set ingest.raw_uri; the built-in cohort never changes, so it never needs retraining")
    if STAGES[MONITOR_STAGE].uri_argument != "new_patients_uri" or STAGES[FETCHING_STAGE].uri_argument != "raw_uri":
        raise ValueError("the monitor and fetching stages' URI parameters changed; update this pipeline")
    components = build_components(image, gpu_image)
    monitor_component = build_predict_components(image)[MONITOR_STAGE]
    default_params_json = params_to_json(params)

    @dsl.pipeline(name=RETRAIN_PIPELINE, description=PIPELINE_DESCRIPTION)
    def meddiff_retrain(params_json: str = default_params_json, raw_uri: str = default_raw_uri) -> None:
        check = monitor_component(params_json=params_json, new_patients_uri=raw_uri)
        _configure(check, MONITOR_STAGE, params.pipeline).set_display_name(MONITOR_STAGE)
        with dsl.If(check.outputs["retrain"] == True, name=RETRAIN_BRANCH):  # noqa: E712 (a KFP condition)
            add_stage_tasks(components, PIPELINE_STAGES[len(SOURCE_STAGES):], params, params_json, raw_uri,
                            from_uri=True)

    return meddiff_retrain


def compile_retrain_pipeline(
    params: Params, output: Path, image: str | None = None, gpu_image: str | None = None, raw_uri: str | None = None,
) -> Path:
    """Compile ``meddiff-retrain`` to the IR YAML file ``output``, written atomically.

    Raises:
        ValueError: ``output`` is not a ``.yaml`` / ``.yml`` file.
        UserError: no ``raw_uri``.
    """
    return write_compiled(build_retrain_pipeline(params, image=image, gpu_image=gpu_image, raw_uri=raw_uri), output)
