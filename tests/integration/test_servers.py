"""The pipeline against real servers on loopback: ``moto_server`` (S3) and ``mlflow server`` (sqlite backend,
artifacts proxied to ``s3://mlflow/mlartifacts`` on moto), the whole pipeline run with ``kfp.local`` on tiny
params (as tests/kfp/test_local_run.py), then:

* the registered model version with alias ``candidate`` is read back through the MLflow client, from the
  run that train recorded in ``run.json``;
* the model's artefacts are objects in the S3 bucket (boto3 ``list_objects_v2``), not local files;
* the processed data is pushed with DVC to the S3 remote and its objects are in the ``dvc`` bucket.

Both servers are always stopped (context managers in servers.py); every wait has a deadline.
"""

import importlib.util
import json
import shutil
import time
from pathlib import Path

import meddiff_test_servers as servers  # tests/integration/servers.py, registered by conftest.py
import pytest
from kfp import local

from meddiff.config import apply_overrides, load_params
from meddiff.data import s3

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Task .* have no effect in the current local runner:UserWarning"),
]


def tiny_overrides() -> list[str]:
    """``TINY_OVERRIDES`` of tests/kfp/test_local_run.py (one source for the tiny pipeline's params)."""
    path = REPO / "tests" / "kfp" / "test_local_run.py"
    spec = importlib.util.spec_from_file_location("meddiff_test_local_run", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.TINY_OVERRIDES)


#: on top of the tiny params: a few latent-diffusion refinement epochs keep the run short on 2 cores
EXTRA_OVERRIDES = ["train.diffusion.refine_epochs=3"]


def task_dir(root: Path, task: str) -> Path:
    (run,) = [path for path in root.iterdir() if path.is_dir()]
    return run / task


def test_pipeline_with_mlflow_server_and_s3(moto: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow.artifacts
    from meddiff_pipelines.pipeline import build_pipeline
    from mlflow.tracking import MlflowClient

    for bucket in ("mlflow", "dvc"):
        servers.create_bucket(moto, bucket)
    params = apply_overrides(load_params(REPO / "params.yaml"), [*tiny_overrides(), *EXTRA_OVERRIDES])
    root, workdir = tmp_path / "pipeline_root", tmp_path / "work"
    workdir.mkdir()

    started = time.perf_counter()
    with servers.mlflow_server(tmp_path / "logs", f"sqlite:///{tmp_path / 'mlflow.db'}", "s3://mlflow/mlartifacts",
                               s3_endpoint=moto) as mlflow_server:
        monkeypatch.chdir(workdir)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)  # the tasks inherit it
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
        print(f"mlflow server up: {time.perf_counter() - started:.0f} s")
        build_pipeline(params, image="meddiff:test")()
        print(f"pipeline done: {time.perf_counter() - started:.0f} s")

        run = json.loads((task_dir(root, "train") / "model" / "run.json").read_text())
        assert run["tracking_uri"] == mlflow_server.url
        client = MlflowClient(tracking_uri=mlflow_server.url)
        version = client.get_model_version_by_alias(params.tracking.registered_model, "candidate")
        assert version.run_id == run["mlflow_run_id"]
        assert str(version.version) == str(run["registered_version"])
        mlflow_run = client.get_run(run["mlflow_run_id"])
        assert mlflow_run.info.status == "FINISHED"
        assert mlflow_run.info.artifact_uri.startswith("mlflow-artifacts:"), "artefacts must go through the server"
        assert "best_val_auc_macro" in mlflow_run.data.metrics
        # and the server hands the model back from the bucket (models:/ resolves through the registry)
        mlmodel = mlflow.artifacts.download_artifacts(
            f"models:/{params.tracking.registered_model}@candidate/MLmodel", dst_path=str(tmp_path / "download"),
            tracking_uri=mlflow_server.url,
        )
        assert "python_function" in Path(mlmodel).read_text()

    # the server is stopped: what is in the bucket was written there, not served from memory by MLflow
    keys = servers.s3_keys(moto, "mlflow", "mlartifacts/")
    assert any(key.endswith("/MLmodel") for key in keys), keys[:20]
    assert any("/model_dir/" in key or key.endswith((".pt", ".safetensors")) for key in keys), keys[:40]
    assert not (workdir / "mlartifacts").exists() and not (workdir / "mlruns").exists()

    # version the processed data on the S3 remote
    repo = servers.init_git_dvc_repo(tmp_path / "repo")
    shutil.copytree(task_dir(root, "preprocess") / "processed", repo / "data" / "processed")
    n_files = sum(1 for p in (repo / "data" / "processed").rglob("*") if p.is_file())
    servers.dvc("add", "data/processed", cwd=repo)
    s3.configure_dvc_remote(repo, url="s3://dvc/meddiff", endpoint=moto)
    servers.dvc("push", cwd=repo)
    dvc_keys = servers.s3_keys(moto, "dvc", "meddiff/")
    assert len(dvc_keys) >= n_files > 0  # one object per distinct file content, plus the .dir listing
    assert any(key.endswith(".dir") for key in dvc_keys)
    print(f"dvc push done: {time.perf_counter() - started:.0f} s")
