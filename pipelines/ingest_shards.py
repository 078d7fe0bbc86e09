"""The ingest fan-out of the ``meddiff`` pipeline (``pipeline.ingest_shards > 1``, issue 14).

::

    [cohort →] ParallelFor(shard in 0 … n-1): ingest-shard(shard/n)  →  ingest-merge  → preprocess → …

Each ``ingest-shard`` task ingests the patients of its shard (:mod:`meddiff.data.ingest.shard`);
``ingest-merge`` receives the shards' outputs through ``dsl.Collected`` and writes the outputs of one
``ingest`` task, so it stands in for ``ingest`` in the graph (its display name is ``ingest``) and the
later tasks are wired to it unchanged. Both run in the CPU image of the ``ingest`` component, with
its settings (resources, timeout, retries, caching, credentials). ``kfp.local`` runs the loop.

No ``from __future__ import annotations``: KFP components and pipelines read real annotations.
"""

from collections.abc import Callable

from kfp import dsl
from kfp.dsl.python_component import PythonComponent
from meddiff_components.ingest_shards import build_shard_components
from meddiff_pipelines.fan_out import add_fan_out, component_image

#: display names: the loop, each shard task; the merge task shows as the stage it replaces
SHARD_LOOP, SHARD_TASK = "ingest shards", "ingest shard"
#: output artifacts of ``ingest`` that each shard writes and the merge collects (``<name>_shards``)
SHARD_OUTPUTS = ("interim", "quarantine", "report")


def add_ingest_fan_out(
    ingest: PythonComponent, shards: int, arguments: dict[str, object], display_name: str,
    configure: Callable[[dsl.PipelineTask], dsl.PipelineTask],
) -> dsl.PipelineTask:
    """Add ``dsl.ParallelFor`` over shards ``0 … shards-1`` of ``ingest`` and the merge task to the current
    graph context; return the merge task (outputs as ``ingest``: ``interim``, ``quarantine``, ``report``,
    ``data_version``).

    Args:
        ingest: the ``ingest`` component (its image is reused).
        shards: the shard count, at least 2 (``pipeline.ingest_shards``).
        arguments: the arguments the ``ingest`` task would get (``params_json``, ``raw``, ``raw_uri``).
        display_name: the merge task's display name (the stage name).
        configure: applies the ingest task's settings to a task (resources, retries, caching, ...).

    Raises:
        ValueError: ``shards < 2`` (one shard is the plain ``ingest`` task).
    """
    shard_component, merge_component = build_shard_components(component_image(ingest))
    return add_fan_out(
        "ingest", shards, shard_component, merge_component, arguments,
        lambda shard: {f"{name}_shards": dsl.Collected(shard.outputs[name]) for name in SHARD_OUTPUTS},
        (SHARD_LOOP, SHARD_TASK), display_name, configure)
