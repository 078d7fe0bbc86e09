"""The preprocess fan-out of the ``meddiff`` pipeline (``pipeline.preprocess_shards > 1``, issue 14).

::

    ingest → ParallelFor(shard in 0 … n-1): preprocess-shard(shard/n)  →  preprocess-merge  → train → …

Each ``preprocess-shard`` task writes the volumes of its patients (the processed format keeps volumes per
shard, :mod:`meddiff.data.dataset`); ``preprocess-merge`` collects the shard folders with ``dsl.Collected``
and writes the outputs of one ``preprocess`` task (splits, tokenizer and scalers fitted on the whole
manifest's training split), so it stands in for ``preprocess`` in the graph (display name ``preprocess``)
and later tasks are wired to it unchanged. Both run in the image of the ``preprocess`` component with its
settings. No stage holds the whole cohort's volumes in memory. ``kfp.local`` runs the loop.

No ``from __future__ import annotations``: KFP components and pipelines read real annotations.
"""

from collections.abc import Callable

from kfp import dsl
from kfp.dsl.python_component import PythonComponent
from meddiff_components.preprocess_shards import build_preprocess_shard_components
from meddiff_pipelines.fan_out import add_fan_out, component_image

#: display names of the loop and of each shard task; the merge task shows as the stage it replaces
SHARD_LOOP, SHARD_TASK = "preprocess shards", "preprocess shard"


def add_preprocess_fan_out(
    preprocess: PythonComponent, shards: int, arguments: dict[str, object], display_name: str,
    configure: Callable[[dsl.PipelineTask], dsl.PipelineTask],
) -> dsl.PipelineTask:
    """Add ``dsl.ParallelFor`` over shards ``0 … shards-1`` of ``preprocess`` and the merge task to the current
    graph context; return the merge task (outputs as ``preprocess``: ``processed``, ``report``).

    Args:
        preprocess: the ``preprocess`` component (its image is reused).
        shards: the shard count, at least 2 (``pipeline.preprocess_shards``).
        arguments: the arguments the ``preprocess`` task would get (``params_json``, ``interim``,
            ``data_version``).
        display_name: the merge task's display name (the stage name).
        configure: applies the preprocess task's settings to a task (resources, timeout, caching, ...).

    Raises:
        ValueError: ``shards < 2`` (one shard is the plain ``preprocess`` task).
    """
    shard_component, merge_component = build_preprocess_shard_components(component_image(preprocess))
    # The shard tasks take no data_version: kfp.local 2.17 hands a ParallelFor task the loop item for an
    # upstream task's output parameter (shard 1 got 1.0). Each shard reads it from its interim folder instead.
    shard_arguments = {key: value for key, value in arguments.items() if key != "data_version"}
    return add_fan_out(
        "preprocess", shards, shard_component, merge_component, shard_arguments,
        lambda shard: {**arguments, "processed_shards": dsl.Collected(shard.outputs["processed"])},
        (SHARD_LOOP, SHARD_TASK), display_name, configure)
