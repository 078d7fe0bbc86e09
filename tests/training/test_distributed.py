"""DistributedDataParallel training with two CPU processes on the gloo backend (torchrun)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from meddiff.config import apply_overrides

TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is installed with torch; not found next to python")
def test_ddp_two_processes_train(tiny_processed, tiny_params, tmp_path: Path) -> None:
    processed, data = tiny_processed
    params = apply_overrides(tiny_params, ["train.epochs=2", f"paths.checkpoints={tmp_path}/checkpoints"])
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.to_dict()))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "meddiff.cli", "train",
         "--params", str(params_file), "--processed-dir", str(processed), "--model-dir", str(tmp_path / "models")],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    _check_ddp_model(tmp_path / "models", data)


def _check_ddp_model(model_dir: Path, data: object) -> None:
    """Two epochs, registered once (by rank 0), best epoch's weights that reproduce its validation AUC."""
    run = json.loads((model_dir / "run.json").read_text())
    assert run["epochs_run"] == 2
    assert run["registered_version"] == "1"  # rank 0 alone registered
    history = json.loads((model_dir / "history.json").read_text())
    val_aucs = [h["val_auc_macro"] for h in history]
    assert run["best_epoch"] == val_aucs.index(max(val_aucs)) and run["best_val_auc"] == max(val_aucs)
    # Rank 0 saved the best epoch's weights: they reproduce its validation AUC (on one thread, as there).
    import torch

    from meddiff.model.multimodal import MedDiffModel
    from meddiff.training.loop import validation_auc

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        auc = validation_auc(MedDiffModel.from_pretrained(model_dir), data)["auc_macro"]
    finally:
        torch.set_num_threads(threads)
    assert auc == run["best_val_auc"]


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is installed with torch; not found next to python")
def test_trainjob_entry_point_two_processes(tiny_processed, tiny_params, tmp_path: Path) -> None:
    """The command of the Kubeflow TrainJob (meddiff_components.trainjob), run here as its one node with two
    CPU processes and the PET_* variables Kubeflow Trainer's Torch plugin injects; inputs staged on a
    stand-in of the shared volume as the train task stages them."""
    from meddiff_components.trainjob import TORCHRUN_COMMAND, SharedRun, build_trainjob, trainjob_name
    from meddiff_components.trainjob_run import stage_inputs

    processed, data = tiny_processed
    shared = tmp_path / "shared"
    params = apply_overrides(tiny_params, [
        "train.epochs=2", "train.nodes=1", "train.gpus_per_node=2", f"pipeline.shared_volume_path={shared}",
        "paths.checkpoints=checkpoints",  # relative: a multi-GPU run keeps it under the shared volume
    ])
    run = SharedRun.for_params(params, trainjob_name("0123456789abcdef"))
    request = build_trainjob(stage_inputs(params, processed, run), "meddiff:test", run, "0123456789abcdef")
    command = next(option.command for option in request.options if hasattr(option, "command"))
    args = next(option.args for option in request.options if hasattr(option, "args"))
    assert tuple(command) == TORCHRUN_COMMAND == ("torchrun",)
    with socket.socket() as probe:  # a free port for the rendezvous (PET_MASTER_PORT)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env |= {"OMP_NUM_THREADS": "1", "PET_NNODES": "1", "PET_NPROC_PER_NODE": "2", "PET_NODE_RANK": "0",
            "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)}
    result = subprocess.run([str(TORCHRUN), *args], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    _check_ddp_model(Path(run.model), data)
    checkpoints = Path(run.checkpoints)
    assert checkpoints == shared / "checkpoints" and checkpoints.is_dir()  # used, then emptied once trained
    assert list(checkpoints.iterdir()) == []
