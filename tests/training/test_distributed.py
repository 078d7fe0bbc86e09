"""DistributedDataParallel training with two CPU processes on the gloo backend (torchrun)."""

from __future__ import annotations

import json
import os
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
    run = json.loads((tmp_path / "models" / "run.json").read_text())
    assert run["epochs_run"] == 2
    assert run["registered_version"] == "1"  # rank 0 alone registered
    history = json.loads((tmp_path / "models" / "history.json").read_text())
    val_aucs = [h["val_auc_macro"] for h in history]
    assert run["best_epoch"] == val_aucs.index(max(val_aucs)) and run["best_val_auc"] == max(val_aucs)
    # Rank 0 saved the best epoch's weights: they reproduce its validation AUC (on one thread, as there).
    import torch

    from meddiff.model.multimodal import MedDiffModel
    from meddiff.training.loop import validation_auc

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        auc = validation_auc(MedDiffModel.from_pretrained(tmp_path / "models"), data)["auc_macro"]
    finally:
        torch.set_num_threads(threads)
    assert auc == run["best_val_auc"]
