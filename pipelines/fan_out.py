"""The shape every data fan-out of the ``meddiff`` pipeline shares (issue 14): ``dsl.ParallelFor`` over shards
``0 … n-1`` of a stage's shard component, then one merge task that collects the shards' outputs and stands in
for the stage (its display name is the stage's). :mod:`.ingest_shards` and :mod:`.preprocess_shards` say what
each stage's shards get and what its merge collects.

No ``from __future__ import annotations``: KFP components and pipelines read real annotations.
"""

from collections.abc import Callable

from kfp import dsl
from kfp.dsl.python_component import PythonComponent


def component_image(component: PythonComponent) -> str:
    """The image a built component runs in."""
    return component.component_spec.implementation.container.image


def add_fan_out(
    stage: str, shards: int, shard_component: PythonComponent, merge_component: PythonComponent,
    shard_arguments: dict[str, object], merge_arguments: Callable[[dsl.PipelineTask], dict[str, object]],
    names: tuple[str, str], display_name: str, configure: Callable[[dsl.PipelineTask], dsl.PipelineTask],
) -> dsl.PipelineTask:
    """Add the loop of ``shard_component`` and the merge task to the current graph context; return the merge.

    Args:
        stage: the stage fanned out (for the error message).
        shards: the shard count, at least 2.
        shard_component / merge_component: the stage's shard and merge components.
        shard_arguments: what every shard task gets besides ``shard_index`` (the loop item) and ``shard_count``.
        merge_arguments: the merge task's arguments, given the loop's shard task (to ``dsl.Collected`` its outputs).
        names: display names of the loop and of each shard task.
        display_name: the merge task's display name (the stage name).
        configure: applies the stage task's settings to a task (resources, timeout, retries, caching, ...).

    Raises:
        ValueError: ``shards < 2`` (one shard is the plain stage task).
    """
    if shards < 2:
        raise ValueError(f"the {stage} fan-out needs at least 2 shards, got {shards}; 1 runs the plain {stage} task")
    loop_name, shard_name = names
    with dsl.ParallelFor(items=list(range(shards)), name=loop_name) as index:
        shard = shard_component(**shard_arguments, shard_index=index, shard_count=shards)
        shard.set_display_name(shard_name)
        configure(shard)
    merge = merge_component(**merge_arguments(shard))
    merge.set_display_name(display_name)
    return configure(merge)
