import subprocess
import sys

from meddiff.cli import build_parser
from meddiff.stages import STAGES


def test_help_lists_every_stage_without_heavy_imports() -> None:
    code = (
        "import sys\n"
        "from meddiff.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'monai', 'mlflow', 'great_expectations', 'kfp') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for stage in [*STAGES, "pipeline"]:
        assert stage in out
    assert "HEAVY []" in out


def test_stage_flags_default_to_params_paths() -> None:
    args = build_parser().parse_args(["ingest", "--raw-dir", "x/raw"])
    assert args.raw_dir == "x/raw"
    assert args.interim_dir is None  # resolved from params.paths at run time


def test_bad_params_exit_code(tmp_path) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_text("train:\n  epochs: -1\n")
    result = subprocess.run(
        [sys.executable, "-m", "meddiff.cli", "train", "--params", str(bad)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "train.epochs" in result.stderr
