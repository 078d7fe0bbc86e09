"""The Kubeflow pipeline run on the team's data (issue 13): ``raw_uri`` names an S3 prefix on a real
``moto_server`` where the built-in cohort was written beforehand; the whole pipeline runs under
``kfp.local`` (``meddiff pipeline run --runner subprocess``) and

* ``cohort`` does not run (the ``dsl.If(raw_uri == "")`` branch is skipped),
* ingest fetched the drop from S3 and read it (its patient count comes from the uploaded files),
* ``data_version`` is the drop's hash (its S3 manifest of keys and ETags) in ingest's output, in the
  result of every later task and in what train saw in ``$MEDDIFF_DATA_VERSION``.

The stages past the KFP shell are the stand-ins of ``tests/kfp/fake_stages`` (as in
``tests/kfp/test_local_run.py``), so the test takes seconds; the fetch and hash run for real in the task.
"""

import json
from pathlib import Path

import meddiff_test_servers as servers  # tests/integration/servers.py, registered by conftest.py
import pytest

from meddiff.cli import main
from meddiff.config import apply_overrides, load_params
from meddiff.data import drop, s3
from meddiff.data.cohort import generate_cohort
from meddiff.stage_table import PIPELINE_STAGES

REPO = Path(__file__).resolve().parents[2]
FAKE_STAGES = REPO / "tests" / "kfp" / "fake_stages"
DROP_URI = "s3://hospital/exports/2026-11"
N_PATIENTS = 8

pytestmark = [
    pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Task .* have no effect in the current local runner:UserWarning"),
]


def test_pipeline_reads_the_s3_drop_and_skips_the_cohort(
    moto: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = [f"cohort.n_patients={N_PATIENTS}", "cohort.num_workers=1", "train.epochs=1"]
    params = apply_overrides(load_params(REPO / "params.yaml"), overrides)
    cohort = generate_cohort(params, tmp_path / "cohort").raw_dir  # written beforehand, in this process
    monkeypatch.setenv("MEDDIFF_S3_ENDPOINT_URL", moto)  # the tasks inherit endpoint and dummy credentials
    monkeypatch.setenv(s3.STAGING_VARIABLE, str(tmp_path / "staging"))
    servers.create_bucket(moto, "hospital")
    client = s3.s3_client()
    files = [path for path in cohort.rglob("*") if path.is_file()]
    for path in files:  # put_object: single-part uploads, whose ETags are the files' MD5s
        client.put_object(Bucket="hospital", Key=f"exports/2026-11/{path.relative_to(cohort).as_posix()}",
                          Body=path.read_bytes())
    client.put_object(Bucket="hospital", Key="exports/2026-12/cohort.json", Body=b"{}")  # another drop
    drop_hash = drop.s3_version(s3.list_objects(s3.parse_s3_uri(DROP_URI), client))
    assert drop_hash == drop.folder_version(cohort)  # the same bytes read from a folder: the same version

    monkeypatch.setenv("PYTHONPATH", str(FAKE_STAGES))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    root = tmp_path / "outputs"
    argv = ["pipeline", "run", "--runner", "subprocess", "--params", str(REPO / "params.yaml"),
            "--raw-uri", DROP_URI, "--pipeline-root", str(root)]
    for override in overrides:
        argv += ["--set", override]

    assert main(argv) == 0

    result = json.loads(capsys.readouterr().out)
    assert result["raw_uri"] == DROP_URI and result["data_version"] == drop_hash
    run_dir = Path(result["run_dir"])
    tasks = {path.name: path for path in run_dir.iterdir() if path.is_dir()}
    assert not [name for name in tasks if name.split("-")[0] == "cohort"], f"cohort ran: {sorted(tasks)}"
    by_stage = {name.split("-")[0]: path for name, path in tasks.items()}
    assert set(by_stage) == set(PIPELINE_STAGES) - {"cohort"}

    assert (by_stage["ingest"] / "data_version").read_text() == drop_hash  # ingest's output parameter
    validation = json.loads((by_stage["ingest"] / "report" / "validation.json").read_text())
    assert validation["records_in"] == N_PATIENTS  # read from the fetched drop's cohort.json
    staged = s3.staging_dir(s3.parse_s3_uri(DROP_URI))
    assert drop.folder_version(staged) == drop_hash and sum(1 for p in staged.rglob("*") if p.is_file()) == len(files)
    assert json.loads((by_stage["train"] / "model" / "run.json").read_text())["data_version"] == drop_hash
    for stage, path in by_stage.items():
        output = json.loads((path / "executor_output.json").read_text())["parameterValues"]["Output"]
        assert output["data_version"] == drop_hash, stage
    assert not list(workdir.iterdir()), "a stage wrote into the working folder"
