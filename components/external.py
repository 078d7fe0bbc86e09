"""The external-validation component of the ``meddiff`` pipeline: a thin shell over
:func:`meddiff.stages.run_component`, like :mod:`meddiff_components.stages`.

``external`` scores the model the run just trained on the labelled drop named by the pipeline parameter
``external_uri`` (``s3://bucket/prefix``, ``dvc://…``): apply-mode admission with the model's own
preprocessing artefacts, then the evaluate stage's metrics, rare class, minority site, masking sweep and
modality subsets (:mod:`meddiff.evaluation.external`). The pipeline runs it only when ``external_uri`` is
given. Its data version is the hash of the external drop it read (the MLflow child run's tag).

No ``from __future__ import annotations``: KFP reads the annotations at decoration time.
"""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output
from kfp.dsl.python_component import PythonComponent
from meddiff_components.stages import default_image


def external(
    params_json: str,
    model: Input[Model],
    external_processed: Output[Dataset],
    report: Output[Artifact],
    metrics: Output[Metrics],
    external_uri: str = "",
) -> dict:
    """Score ``model`` on the labelled drop ``external_uri``: ``external_processed`` receives the admitted drop
    (interim, quarantine, processed), ``report`` ``metrics.json`` (also logged to ``metrics``), the
    probabilities and the robustness tables."""
    from meddiff.stages import run_component

    return run_component(
        "external", params_json, metrics=metrics, uri=external_uri, model=model,
        external_processed=external_processed, report=report,
    )


def build_external_component(image: str | None = None) -> PythonComponent:
    """The ``external`` component in ``image`` (default :func:`default_image`), no run-time pip install."""
    return dsl.component(external, base_image=image or default_image(), install_kfp_package=False)
