import os
import subprocess
import sys
from pathlib import Path

from meddiff.cli import build_parser
from meddiff.stage_table import STAGES


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


def test_missing_deid_key_is_one_line_not_a_traceback(tmp_path) -> None:
    """A real drop (no cohort provenance file) without MEDDIFF_DEID_KEY: one actionable line, exit 2."""
    raw = tmp_path / "raw"
    (raw / "notes").mkdir(parents=True)
    (raw / "notes" / "P1.txt").write_text("CT head: no acute intracranial abnormality.\n")
    env = {k: v for k, v in os.environ.items() if k != "MEDDIFF_DEID_KEY"}
    result = subprocess.run(
        [sys.executable, "-m", "meddiff.cli", "ingest", "--raw-dir", str(raw), "--interim-dir", str(tmp_path / "i"),
         "--quarantine-dir", str(tmp_path / "q"), "--report-dir", str(tmp_path / "r")],
        capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("meddiff ingest: error:")]
    assert "MEDDIFF_DEID_KEY" in line


def test_logging_keeps_library_chatter_out(capsys) -> None:
    import logging

    from meddiff.cli import configure_logging

    root_handlers, root_level = list(logging.getLogger().handlers), logging.getLogger().level
    try:
        logging.getLogger().handlers.clear()
        configure_logging(verbose=False)
        logging.getLogger("great_expectations._docs_decorators").info("Skipping registering function")
        logging.getLogger("meddiff.data.ingest").info("ingest finished")
        logging.getLogger("great_expectations").warning("a real warning")
        err = capsys.readouterr().err
        assert "Skipping registering" not in err
        assert "ingest finished" in err and "a real warning" in err
    finally:
        logging.getLogger().handlers[:] = root_handlers
        logging.getLogger().setLevel(root_level)
        logging.getLogger("meddiff").setLevel(logging.NOTSET)
