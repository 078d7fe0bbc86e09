from pathlib import Path

import pytest

from meddiff.io import atomic_dir, atomic_file, write_json


def test_atomic_dir_replaces_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_dir(target) as staging:
        (staging / "a.txt").write_text("first")
    with pytest.raises(RuntimeError), atomic_dir(target) as staging:
        (staging / "a.txt").write_text("half")
        raise RuntimeError("crash mid-stage")
    assert (target / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp leftovers


def test_atomic_file_leaves_old_content_on_failure(tmp_path: Path) -> None:
    target = write_json(tmp_path / "m.json", {"a": 1})
    with pytest.raises(ValueError), atomic_file(target) as handle:
        handle.write("{broken")
        raise ValueError("boom")
    assert target.read_text().strip().startswith("{\n")


def test_atomic_outputs_get_the_usual_permissions(tmp_path: Path) -> None:
    import os

    umask = os.umask(0o022)
    os.umask(umask)
    target = write_json(tmp_path / "m.json", {"a": 1})
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    with atomic_dir(tmp_path / "d") as staging:
        (staging / "x").write_text("x")
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~umask
