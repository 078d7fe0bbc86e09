"""The ``meddiff-predict`` Kubeflow pipeline: batch prediction for a raw drop of new patients.

::

    if new_patients_uri == "":   new_patients → predict | monitor
    else:                        predict(new_patients_uri) | monitor(new_patients_uri)

``new_patients_uri`` names the hospital's drop (``s3://bucket/prefix`` or ``dvc://…``; default
``predict.new_patients_uri`` of the params, "" in ``params.yaml``); without one the built-in drop of new
patients is written first. ``predict`` ingests and preprocesses in apply mode with the artefacts saved with
the model and scores with ``predict.model_uri`` (default ``models:/<registered model>@champion``), so it
runs after a training run has promoted a champion, on its own schedule. Task settings (resources,
credentials, pod labels, retries, caching) come from the stage table and ``params.pipeline``, as in
:mod:`meddiff_pipelines.pipeline`.

No ``from __future__ import annotations``: KFP reads the pipeline function's annotations at decoration time.
"""

from collections.abc import Callable
from pathlib import Path

from kfp import dsl
from meddiff_components.predict import build_predict_components
from meddiff_pipelines.pipeline import _configure, params_to_json, write_compiled

from meddiff.config import Params
from meddiff.stage_table import PREDICT_PIPELINE, STAGES

PIPELINE_DESCRIPTION = (
    "Batch prediction for new patients: apply-mode ingest and preprocess with the model's artefacts, the "
    "registry champion, class probabilities and FHIR R4 RiskAssessments."
)
#: display names of the two branches of the fork on ``new_patients_uri``
BUILT_IN_BRANCH = "built-in new patients (no new_patients_uri)"
DROP_BRANCH = "raw drop (new_patients_uri)"


def build_predict_pipeline(params: Params, image: str | None = None,
                           new_patients_uri: str | None = None) -> Callable[..., None]:
    """The ``meddiff-predict`` pipeline for ``params``: parameters ``params_json`` (default: these params as
    JSON) and ``new_patients_uri`` (default: ``predict.new_patients_uri``)."""
    components = build_predict_components(image)
    default_params_json = params_to_json(params)
    default_uri = params.predict.new_patients_uri if new_patients_uri is None else new_patients_uri
    uri_parameter = STAGES["predict"].uri_argument
    if uri_parameter != "new_patients_uri":  # the pipeline function below spells the parameter out
        raise ValueError(f"stage 'predict' fetches {uri_parameter!r}; the pipeline declares new_patients_uri")
    settings = params.pipeline

    @dsl.pipeline(name=PREDICT_PIPELINE, description=PIPELINE_DESCRIPTION)
    def meddiff_predict(params_json: str = default_params_json, new_patients_uri: str = default_uri) -> None:
        with dsl.If(new_patients_uri == "", name=BUILT_IN_BRANCH):
            drop = _configure(components["new_patients"](params_json=params_json), "new_patients", settings)
            drop.set_display_name("new_patients")
            for name in ("predict", "monitor"):
                task = components[name](params_json=params_json, new_patients_uri=new_patients_uri,
                                        new_patients=drop.outputs["new_patients"])
                _configure(task, name, settings).set_display_name(name)
        with dsl.Else(name=DROP_BRANCH):
            for name in ("predict", "monitor"):
                task = components[name](params_json=params_json, new_patients_uri=new_patients_uri)
                _configure(task, name, settings).set_display_name(name)

    return meddiff_predict


def compile_predict_pipeline(params: Params, output: Path, image: str | None = None,
                             new_patients_uri: str | None = None) -> Path:
    """Compile the ``meddiff-predict`` pipeline to the IR YAML file ``output``, written atomically.

    Raises:
        ValueError: ``output`` is not a ``.yaml`` / ``.yml`` file.
    """
    return write_compiled(build_predict_pipeline(params, image=image, new_patients_uri=new_patients_uri), output)
