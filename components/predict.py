"""The components of the ``meddiff-predict`` pipeline (batch prediction for new patients): thin shells over
:func:`meddiff.stages.run_component`, like :mod:`meddiff_components.stages`.

* ``new_patients`` writes the built-in drop of new patients (``params.drops.new_patients``);
* ``predict`` reads the drop named by ``new_patients_uri`` (``s3://``, ``dvc://``) or, when it is "", the
  ``new_patients`` artifact, and writes ``predictions.csv``, ``risk_assessments.ndjson``, the quarantine
  and ``metrics.json`` into ``report`` (the numbers also as the task's ``metrics``). The model comes from
  the registry (``predict.model_uri``, default the champion), so the task is never cached;
* ``monitor`` reads the same drop and compares it with the model's training data (evidently drift per
  feature group) and outputs ``retrain``, which the recurring ``meddiff-retrain`` pipeline branches on.

No ``from __future__ import annotations``: KFP reads the annotations at decoration time.
"""

from collections.abc import Callable

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Output, OutputPath
from kfp.dsl.python_component import PythonComponent
from meddiff_components.stages import default_image

from meddiff.stage_table import PREDICT_STAGES


def new_patients(params_json: str, new_patients: Output[Dataset]) -> dict:
    """Write the built-in drop of new, unlabelled patients into ``new_patients``."""
    from meddiff.stages import run_component

    return run_component("new_patients", params_json, new_patients=new_patients)


def predict(
    params_json: str,
    report: Output[Artifact],
    metrics: Output[Metrics],
    data_version: OutputPath(str),
    new_patients: Input[Dataset] = None,
    new_patients_uri: str = "",
) -> dict:
    """Class probabilities and FHIR RiskAssessments for the drop ``new_patients_uri`` or, when it is "", the
    ``new_patients`` artifact; ``data_version`` receives the content hash of the drop read."""
    from meddiff.stages import run_component

    return run_component(
        "predict", params_json, metrics=metrics, uri=new_patients_uri, version_output=data_version,
        new_patients=new_patients, report=report,
    )


def monitor(
    params_json: str,
    report: Output[Artifact],
    metrics: Output[Metrics],
    html: Output[HTML],
    data_version: OutputPath(str),
    retrain: OutputPath(bool),
    new_patients: Input[Dataset] = None,
    new_patients_uri: str = "",
) -> dict:
    """Drift of the drop ``new_patients_uri`` (or the ``new_patients`` artifact) against the model's training
    data: ``report`` holds ``decision.json``, ``drift.json`` and evidently's pages, ``html`` the summary page;
    ``retrain`` is the decision a recurring pipeline branches on."""
    from meddiff.stages import run_component

    return run_component(
        "monitor", params_json, metrics=metrics, html=html, uri=new_patients_uri, version_output=data_version,
        result_outputs={"retrain": retrain}, new_patients=new_patients, report=report,
    )


#: Component function per stage of the prediction pipeline, in order.
PREDICT_FUNCTIONS: dict[str, Callable[..., dict]] = {"new_patients": new_patients, "predict": predict,
                                                     "monitor": monitor}
if tuple(PREDICT_FUNCTIONS) != PREDICT_STAGES:
    raise ImportError(f"components {list(PREDICT_FUNCTIONS)} do not match the stage table {list(PREDICT_STAGES)}")


def build_predict_components(image: str | None = None) -> dict[str, PythonComponent]:
    """The prediction pipeline's components in ``image`` (default :func:`default_image`), no run-time pip install."""
    chosen = image or default_image()
    return {name: dsl.component(function, base_image=chosen, install_kfp_package=False)
            for name, function in PREDICT_FUNCTIONS.items()}
