"""``make images`` / ``docker/build_images.py``: tags, the Makefile target, and failing fast without an engine.

No Docker engine runs here, so nothing is built: these tests check what would be built and pushed, and
that an absent or silent engine stops the script at once with a clear message.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

import meddiff

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "docker" / "build_images.py"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def load_script() -> ModuleType:
    return load(SCRIPT, "build_images")


def run_script(*args: str, docker_host: str) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {**os.environ, "DOCKER_HOST": docker_host, "MEDDIFF_GIT_COMMIT": COMMIT}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    return result, time.monotonic() - started


def test_tags_are_version_plus_commit() -> None:
    cpu, cuda = load_script().image_specs("registry.example.com:5000/ml/", "0.1.0", COMMIT)
    assert (cpu.dockerfile, cpu.ref) == ("docker/Dockerfile", "registry.example.com:5000/ml/meddiff:0.1.0-0123456789ab")
    assert (cuda.dockerfile, cuda.ref) == (
        "docker/Dockerfile.cuda",
        "registry.example.com:5000/ml/meddiff:0.1.0-0123456789ab-cuda",
    )
    assert (cpu.repository, cpu.tag) == ("registry.example.com:5000/ml/meddiff", "0.1.0-0123456789ab")
    for spec in (cpu, cuda):
        assert (REPO / spec.dockerfile).is_file()


@pytest.mark.parametrize("registry", ["", "https://ghcr.io/meddiff", "my registry"])
def test_bad_registry_is_refused(registry: str) -> None:
    with pytest.raises(ValueError, match="host\\[:port\\]/path"):
        load_script().image_specs(registry, "0.1.0", COMMIT)


def test_no_engine_fails_at_once(tmp_path: Path) -> None:
    socket_path = tmp_path / "docker.sock"
    result, seconds = run_script("--registry", "127.0.0.1:5000/meddiff", docker_host=f"unix://{socket_path}")
    assert result.returncode == 3, result.stderr
    assert f"no Docker engine answers at unix://{socket_path}" in result.stderr
    assert "nothing was built" in result.stderr
    assert "MEDDIFF_IMAGE=" not in result.stdout
    assert seconds < 15  # the interpreter start-up and imports dominate; the check itself takes milliseconds


def test_silent_engine_times_out_quickly() -> None:
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        host = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        result, seconds = run_script("--registry", "127.0.0.1:5000/meddiff", "--timeout", "1", docker_host=host)
    assert result.returncode == 3, result.stderr
    assert f"no Docker engine answers at {host}" in result.stderr
    assert seconds < 15


@pytest.fixture
def make() -> str:
    found = shutil.which("make")
    if found is None:
        pytest.skip("make is not installed")
    return found


def run_make(make: str, *arguments: str) -> subprocess.CompletedProcess:
    """``make -n`` as a user would type it: not inheriting the flags of a ``make test`` around us
    (a sub-make would print "Entering directory" lines)."""
    env = {k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES"}}
    return subprocess.run(
        [make, "--no-print-directory", "-n", *arguments], cwd=REPO, capture_output=True, text=True, timeout=60, env=env
    )


def test_make_images_needs_a_registry(make: str) -> None:
    result = run_make(make, "images")
    assert result.returncode != 0
    assert "REGISTRY is not set: make images REGISTRY=" in result.stderr


def test_make_images_runs_the_script(make: str) -> None:
    # -n: print the commands only (nothing is installed or built)
    result = run_make(make, "images", "REGISTRY=127.0.0.1:5000/meddiff", "IMAGES_FLAGS=--no-push")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].split() == [
        ".venv/bin/python", "docker/build_images.py", "--registry", '"127.0.0.1:5000/meddiff"', "--no-push",
    ]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_images_carry_the_commit(dockerfile: str) -> None:
    """The runtime stage takes MEDDIFF_GIT_COMMIT as a build arg into its environment and labels."""
    parse = load(Path(__file__).with_name("test_dockerfiles.py"), "dockerfile_checks").parse
    instructions = parse(REPO / "docker" / dockerfile)
    last_from = max(i for i, instruction in enumerate(instructions) if instruction.keyword == "FROM")
    runtime = instructions[last_from:]
    assert any(i.keyword == "ARG" and i.arguments.startswith("MEDDIFF_GIT_COMMIT") for i in runtime)
    assert any(i.keyword == "ENV" and "MEDDIFF_GIT_COMMIT=${MEDDIFF_GIT_COMMIT}" in i.arguments for i in runtime)
    assert any(i.keyword == "LABEL" and "org.opencontainers.image.revision" in i.arguments for i in runtime)


def test_package_version_is_what_the_tag_uses() -> None:
    (cpu, _) = load_script().image_specs("r.example/x", meddiff.__version__, COMMIT)
    assert cpu.tag == f"{meddiff.__version__}-{COMMIT[:12]}"
