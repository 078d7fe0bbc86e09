"""The train task of a multi-GPU pipeline: a small pod that launches and follows a Kubeflow Trainer TrainJob.

When the pipeline is compiled with ``train.nodes × train.gpus_per_node > 1`` the train task requests no GPU
(:data:`~meddiff_components.trainjob.LAUNCHER_RESOURCES`, no GPU toleration or node selector): its
TrainJob's nodes hold the GPUs. It mounts the shared volume (``pipeline.shared_volume`` at
``pipeline.shared_volume_path``), where it stages the data and collects the model, and it learns the image
of the TrainJob, its own, from ``$MEDDIFF_TRAINJOB_IMAGE``. The job itself is built and followed at run
time (:mod:`meddiff_components.trainjob`, :mod:`meddiff_components.trainjob_run`); the task's service
account needs the Role of ``infra/runner`` (TrainJobs, pods and their logs, events).
"""

from __future__ import annotations

from kfp import dsl, kubernetes
from kfp.dsl.python_component import PythonComponent
from meddiff_components.trainjob import LAUNCHER_RESOURCES, TRAINJOB_IMAGE_ENV, is_distributed

from meddiff.config import Params
from meddiff.stage_table import Resources

#: The stage whose task launches a TrainJob when training spans more than one GPU.
TRAIN_STAGE = "train"


def launches_trainjob(stage: str, params: Params) -> bool:
    """True for the train task of a pipeline compiled for more than one GPU."""
    return stage == TRAIN_STAGE and is_distributed(params.train)


def task_resources(stage: str, params: Params) -> Resources | None:
    """The launcher's pod resources for a TrainJob-launching task; ``None``: the stage table's row."""
    return LAUNCHER_RESOURCES if launches_trainjob(stage, params) else None


def configure_launcher(task: dsl.PipelineTask, component: PythonComponent, params: Params) -> dsl.PipelineTask:
    """Mount the shared volume and name the TrainJob image (the component's own) in the launcher task."""
    settings = params.pipeline
    kubernetes.mount_pvc(task, pvc_name=settings.shared_volume, mount_path=settings.shared_volume_path)
    task.set_env_variable(TRAINJOB_IMAGE_ENV, component.component_spec.implementation.container.image)
    return task
