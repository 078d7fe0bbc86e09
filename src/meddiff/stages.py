"""The six stages (plus the built-in cohort) as one registry.

Each stage is one library function ``fn(params, **paths) -> result``. The CLI, the DVC stages (which
call the CLI) and the KFP components all go through :func:`run_stage`, so a stage behaves the same
under every shell. Modules are imported only when a stage runs: ``meddiff --help`` stays fast.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

from meddiff.config import Params


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str
    function: str
    summary: str
    #: keyword argument -> (params.paths attribute, sub-folder appended to it)
    paths: dict[str, tuple[str, str]]


STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (
        StageSpec(
            "cohort", "meddiff.data.cohort", "generate_cohort",
            "write the built-in synthetic cohort (DICOM, NIfTI masks, FHIR R4, notes)",
            {"raw_dir": ("raw", "")},
        ),
        StageSpec(
            "ingest", "meddiff.data.ingest", "run_ingest",
            "read, validate (great-expectations) and quarantine raw records",
            {
                "raw_dir": ("raw", ""),
                "interim_dir": ("interim", ""),
                "quarantine_dir": ("quarantine", ""),
                "report_dir": ("reports", "ingest"),
            },
        ),
        StageSpec(
            "preprocess", "meddiff.data.preprocess", "run_preprocess",
            "MONAI transforms, note tokenizer, tabular scaling, stratified splits",
            {
                "interim_dir": ("interim", ""),
                "processed_dir": ("processed", ""),
                "report_dir": ("reports", "preprocess"),
            },
        ),
        StageSpec(
            "train", "meddiff.training.train", "run_train",
            "train the multimodal diffusion model; log and register it in MLflow",
            {"processed_dir": ("processed", ""), "model_dir": ("models", "")},
        ),
        StageSpec(
            "evaluate", "meddiff.evaluation.evaluate", "run_evaluate",
            "AUC/F1/accuracy on the test split and under 0-80 %% modality masking",
            {"processed_dir": ("processed", ""), "model_dir": ("models", ""), "report_dir": ("reports", "evaluate")},
        ),
        StageSpec(
            "generate", "meddiff.generation.generate", "run_generate",
            "sample class-conditional synthetic patients and measure their quality",
            {
                "processed_dir": ("processed", ""),
                "model_dir": ("models", ""),
                "synthetic_dir": ("synthetic", ""),
                "report_dir": ("reports", "generate"),
            },
        ),
        StageSpec(
            "explain", "meddiff.explain.report", "run_explain",
            "attention attributions, Dice against lesion masks, HTML report",
            {"processed_dir": ("processed", ""), "model_dir": ("models", ""), "report_dir": ("reports", "explain")},
        ),
    )
}


#: Commands that run like stages but are not part of the pipeline (the DVC pipeline in dvc.yaml and
#: the KFP pipeline chain exactly ``STAGES``): the ablation/baseline suite, in suite/dvc.yaml.
EXTRA_COMMANDS: dict[str, StageSpec] = {
    "suite": StageSpec(
        "suite", "meddiff.evaluation.suite", "run_suite",
        "ablations and baselines: same data, same budget, one table + summary (long: trains ~9 models)",
        {"processed_dir": ("processed", ""), "report_dir": ("reports", "evaluate")},
    ),
}
COMMANDS: dict[str, StageSpec] = {**STAGES, **EXTRA_COMMANDS}


def default_paths(params: Params, stage: str) -> dict[str, Path]:
    """The stage's input/output paths as ``params.paths`` defines them."""
    spec = COMMANDS[stage]
    resolved = {}
    for argument, (attribute, sub) in spec.paths.items():
        base = Path(getattr(params.paths, attribute))
        resolved[argument] = base / sub if sub else base
    return resolved


def run_stage(stage: str, params: Params, **paths: str | Path | None) -> Any:
    """Run one stage; paths not given (or ``None``) default to ``params.paths``."""
    if stage not in COMMANDS:
        raise KeyError(f"unknown stage {stage!r}; stages are {sorted(COMMANDS)}")
    spec = COMMANDS[stage]
    unknown = set(paths) - set(spec.paths)
    if unknown:
        raise TypeError(f"stage {stage!r} takes paths {sorted(spec.paths)}, not {sorted(unknown)}")
    resolved = default_paths(params, stage)
    resolved.update({k: Path(v) for k, v in paths.items() if v is not None})
    function = getattr(importlib.import_module(spec.module), spec.function)
    return function(params, **resolved)


def result_to_dict(result: Any) -> dict[str, Any]:
    """A stage result (a dataclass) as a JSON-friendly dict."""
    if is_dataclass(result) and not isinstance(result, type):
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(result).items()}
    if isinstance(result, dict):
        return result
    raise TypeError(f"stage results are dataclasses or dicts, got {type(result).__name__}")
