"""Kubeflow components of the ingest fan-out (``pipeline.ingest_shards > 1``, :mod:`meddiff_pipelines.ingest_shards`).

``ingest_shard`` is the ``ingest`` component with the shard's index and count (``meddiff ingest --shard
i/n``, :mod:`meddiff.data.ingest.shard`); ``ingest_merge`` takes the collected outputs of every shard
(``dsl.Collected``) and has the outputs of ``ingest`` (``interim``, ``quarantine``, ``report``,
``data_version``), so the later tasks read it as they read ``ingest``. Bodies are one library call each
(lightweight components are shipped as source text).

No ``from __future__ import annotations``: KFP reads the annotations at decoration time.
"""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output, OutputPath
from kfp.dsl.python_component import PythonComponent


def ingest_shard(
    params_json: str,
    shard_index: int,
    shard_count: int,
    interim: Output[Dataset],
    quarantine: Output[Dataset],
    report: Output[Artifact],
    data_version: OutputPath(str),
    raw: Input[Dataset] = None,
    raw_uri: str = "",
) -> dict:
    """``ingest`` of shard ``shard_index`` of ``shard_count`` (the patients whose raw id hashes there):
    the same inputs and outputs as the ``ingest`` component, each output marked with its shard."""
    from meddiff.stages import run_component

    return run_component(
        "ingest", params_json, uri=raw_uri, version_output=data_version,
        options={"shard": f"{shard_index}/{shard_count}"}, raw=raw, interim=interim, quarantine=quarantine,
        report=report,
    )


def ingest_merge(
    interim_shards: Input[list[Dataset]],
    quarantine_shards: Input[list[Dataset]],
    report_shards: Input[list[Artifact]],
    interim: Output[Dataset],
    quarantine: Output[Dataset],
    report: Output[Artifact],
    data_version: OutputPath(str),
) -> dict:
    """Merge every shard's outputs into one ingest's ``interim``, ``quarantine`` and ``report``
    (counts summed, manifest sorted as one run sorts it); ``data_version``: the drop the shards read."""
    from meddiff.data.ingest.shard import merge_component

    return merge_component(
        interim_shards, quarantine_shards, report_shards, interim, quarantine, report, data_version
    )


def build_shard_components(image: str) -> tuple[PythonComponent, PythonComponent]:
    """``(ingest_shard, ingest_merge)`` as lightweight components running in ``image`` (no pip install)."""
    return (dsl.component(ingest_shard, base_image=image, install_kfp_package=False),
            dsl.component(ingest_merge, base_image=image, install_kfp_package=False))
