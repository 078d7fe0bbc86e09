"""The architecture holds: layers import one way (import-linter) and ``dvc.yaml`` tells the truth.

``dvc.yaml`` is checked against the stage table (:data:`meddiff.stage_table.STAGES`): the same
pipeline stages in the same order, each running its own CLI subcommand, reading and writing the
table's folders, listing the params sections its code reads and, as code dependencies, every module
its code imports (its import closure, found by grimp, import-linter's graph builder). So editing any
module a stage runs makes ``dvc status`` report that stage as changed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import grimp
import pytest
import yaml

from meddiff.stage_table import DVC_STAGES, STAGES, Port, Stage

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PARAMS_REFERENCE = re.compile(r"\bparams\.([a-z_]+)\b")
#: Sections that are not a stage's hyperparameters: folders come in through the ports (``${paths.*}``);
#: the Kubeflow platform settings never reach a stage.
NOT_STAGE_PARAMS = {"paths", "pipeline", "to_dict", "digest", "yaml"}  # "yaml": the file name params.yaml


@cache
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("meddiff")


def import_closure(stage: Stage) -> set[str]:
    """Every meddiff module the DVC command ``meddiff <stage>`` runs: the stage module, the stage runner and
    the CLI, and all they import, directly or indirectly (imports inside functions included)."""
    modules = {stage.module, "meddiff.stages", "meddiff.cli"}
    for module in list(modules):
        if module != "meddiff.cli":  # the CLI's own lazy imports serve `meddiff pipeline`, not the stages
            modules |= graph().find_upstream_modules(module)
    # Python runs every parent package's __init__ on import; grimp lists only explicit imports.
    parents = {".".join(m.split(".")[:i]) for m in modules for i in range(1, m.count(".") + 1)}
    return {m for m in modules | parents if m.startswith("meddiff")}


def source_file(module: str) -> Path:
    path = SRC.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def code_dependency(module: str) -> str:
    """The ``dvc.yaml`` dependency that covers ``module``: its sub-package folder, or the file of a
    top-level module."""
    parts = module.split(".")
    if len(parts) >= 3 or (len(parts) == 2 and source_file(module).name == "__init__.py"):
        return f"src/meddiff/{parts[1]}"
    return source_file(module).relative_to(REPO).as_posix()


@cache
def dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_layers_contract_holds() -> None:
    result = subprocess.run(
        [str(Path(sys.executable).with_name("lint-imports")), "--no-cache"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "1 kept, 0 broken" in result.stdout


def test_dvc_pipeline_is_the_stage_table() -> None:
    assert tuple(dvc_stages()) == DVC_STAGES
    for name in DVC_STAGES:
        assert dvc_stages()[name]["cmd"] == f"meddiff {name} --params params.yaml", name


@pytest.mark.parametrize("name", DVC_STAGES)
def test_dvc_stage_reads_and_writes_the_table_folders(name: str) -> None:
    stage, entry = STAGES[name], dvc_stages()[name]

    def folder(port: Port) -> str:
        return "${paths." + port.path + "}" + (f"/{port.sub}" if port.sub else "")

    deps = set(entry.get("deps", []))
    missing = [
        folder(port) for port in stage.inputs
        if not any(dep == folder(port) or dep.startswith(folder(port) + "/") for dep in deps)
    ]
    assert not missing, f"dvc.yaml stage {name!r} does not depend on its input folders {missing}"
    written = [
        next(iter(item)) if isinstance(item, dict) else item
        for key in ("outs", "metrics", "plots") for item in entry.get(key, [])
    ]
    for port in stage.outputs:
        assert any(path == folder(port) or path.startswith(folder(port) + "/") for path in written), (
            f"dvc.yaml stage {name!r} declares nothing under its output folder {folder(port)}"
        )


@pytest.mark.parametrize("name", DVC_STAGES)
def test_dvc_stage_depends_on_all_code_it_imports(name: str) -> None:
    closure = import_closure(STAGES[name])
    assert STAGES[name].module in closure and "meddiff.config" in closure
    deps = set(dvc_stages()[name].get("deps", []))
    missing = sorted({code_dependency(module) for module in closure} - deps)
    assert not missing, f"dvc.yaml stage {name!r} runs code it does not depend on: add {missing} to its deps"
    superfluous = sorted(
        dep for dep in deps if dep.startswith("src/") and dep not in {code_dependency(m) for m in closure}
    )
    assert not superfluous, f"dvc.yaml stage {name!r} depends on code it never imports: {superfluous}"


@pytest.mark.parametrize("name", DVC_STAGES)
def test_params_sections_are_those_the_code_reads(name: str) -> None:
    read = set()
    for module in import_closure(STAGES[name]):
        read |= set(PARAMS_REFERENCE.findall(source_file(module).read_text()))
    read = {section for section in read if section not in NOT_STAGE_PARAMS}
    assert set(STAGES[name].params) >= read, f"stage {name!r} reads params sections {sorted(read)}"
    assert set(dvc_stages()[name].get("params", [])) == set(STAGES[name].params)


def test_closure_sees_imports_inside_functions() -> None:
    # evaluate imports mlflow tracking lazily inside a function; the closure must still hold it.
    assert "meddiff.tracking" in import_closure(STAGES["evaluate"])


@pytest.mark.parametrize("name", ["external_drop", "external", "suite"])
def test_suite_dvc_stages_depend_on_all_code_they_import(name: str) -> None:
    """``suite/dvc.yaml`` (``make suite``) is held to the same rule as the main pipeline."""
    entry = yaml.safe_load((REPO / "suite" / "dvc.yaml").read_text())["stages"][name]
    closure = import_closure(STAGES[name])
    missing = sorted({code_dependency(module) for module in closure} - set(entry["deps"]))
    assert not missing, f"suite/dvc.yaml stage {name!r} runs code it does not depend on: add {missing} to its deps"
    assert set(entry["params"]) == set(STAGES[name].params)
