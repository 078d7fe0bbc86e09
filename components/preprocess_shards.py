"""Kubeflow components of the preprocess fan-out (``pipeline.preprocess_shards > 1``,
:mod:`meddiff_pipelines.preprocess_shards`).

``preprocess_shard`` runs the images of one shard of the ingested cohort (``meddiff preprocess --shard i/n``:
the patients whose pseudonymised id hashes there, :mod:`meddiff.data.ingest.shard`) into its own processed
folder; ``preprocess_merge`` takes every shard's folder (``dsl.Collected``), fits the splits, tokenizer and
scalers on the whole manifest as one run does and writes the outputs of ``preprocess`` (``processed``,
``report``) over the shards' volumes (``meddiff preprocess --merge``), so later tasks read it as they read
``preprocess``. Bodies are one library call each (lightweight components are shipped as source text).

No ``from __future__ import annotations``: KFP reads the annotations at decoration time.
"""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output
from kfp.dsl.python_component import PythonComponent


def preprocess_shard(
    params_json: str, shard_index: int, shard_count: int, interim: Input[Dataset], processed: Output[Dataset],
) -> dict:
    """The volumes of shard ``shard_index`` of ``shard_count`` of ``interim`` into ``processed`` (the data version
    is the one ingest recorded in ``interim``)."""
    from meddiff.stages import run_component

    return run_component("preprocess", params_json, options={"shard": f"{shard_index}/{shard_count}"},
                         interim=interim, processed=processed)


def preprocess_merge(
    params_json: str, interim: Input[Dataset], processed_shards: Input[list[Dataset]], processed: Output[Dataset],
    report: Output[Artifact], data_version: str = "",
) -> dict:
    """The processed dataset of the whole cohort over the shards' volumes, and its data card in ``report``."""
    from meddiff.stages import run_component

    return run_component("preprocess", params_json, data_version,
                         options={"merge": [shard.path for shard in processed_shards]}, interim=interim,
                         processed=processed, report=report)


def build_preprocess_shard_components(image: str) -> tuple[PythonComponent, PythonComponent]:
    """``(preprocess_shard, preprocess_merge)`` as lightweight components in ``image`` (no pip install)."""
    return (dsl.component(preprocess_shard, base_image=image, install_kfp_package=False),
            dsl.component(preprocess_merge, base_image=image, install_kfp_package=False))
