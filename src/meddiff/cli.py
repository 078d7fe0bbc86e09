"""``meddiff <stage>``: the command-line shell over :mod:`meddiff.stages`.

Start-up imports only the standard library, PyYAML and pydantic; torch, MONAI, MLflow and
great-expectations are imported by the stage that needs them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from meddiff import __version__
from meddiff.stages import STAGES

LOG = logging.getLogger("meddiff")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a parameter, e.g. --set train.epochs=5 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meddiff",
        description="Multimodal diffusion models for robust, explainable diagnosis. "
        "Stages run in order: cohort → ingest → preprocess → train → evaluate → generate → explain.",
    )
    parser.add_argument("--version", action="version", version=f"meddiff {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    for spec in STAGES.values():
        stage_parser = commands.add_parser(spec.name, help=spec.summary, description=spec.summary)
        _add_common(stage_parser)
        for argument, (attribute, sub) in spec.paths.items():
            flag = "--" + argument.replace("_", "-")
            default_text = f"params paths.{attribute}" + (f" / {sub}" if sub else "")
            stage_parser.add_argument(flag, dest=argument, default=None, help=f"default: {default_text}")

    pipeline = commands.add_parser("pipeline", help="Kubeflow Pipelines: compile the pipeline")
    pipeline_commands = pipeline.add_subparsers(dest="pipeline_command", metavar="ACTION", required=True)
    compile_parser = pipeline_commands.add_parser("compile", help="compile the KFP v2 pipeline to YAML")
    _add_common(compile_parser)
    compile_parser.add_argument("--output", required=True, help="pipeline YAML to write")
    compile_parser.add_argument(
        "--image", default=None, help="stage image (default: MEDDIFF_IMAGE or the versioned project image)"
    )
    return parser


def _load(args: argparse.Namespace):  # -> Params; the import stays out of module start-up
    from meddiff.config import apply_overrides, load_params

    params = load_params(args.params)
    return apply_overrides(params, args.overrides) if args.overrides else params


def _run_stage(args: argparse.Namespace) -> int:
    from meddiff.stages import result_to_dict, run_stage

    params = _load(args)
    paths = {name: getattr(args, name) for name in STAGES[args.command].paths}
    started = time.perf_counter()
    result = run_stage(args.command, params, **paths)
    LOG.info("%s finished in %.1f s", args.command, time.perf_counter() - started)
    print(json.dumps(result_to_dict(result), indent=2, default=str))
    return 0


def _run_pipeline(args: argparse.Namespace) -> int:
    from meddiff_pipelines.pipeline import compile_pipeline

    params = _load(args)
    output = compile_pipeline(params, Path(args.output), image=args.image)
    print(f"wrote {output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from meddiff.config import ParamsError

    try:
        if args.command == "pipeline":
            return _run_pipeline(args)
        return _run_stage(args)
    except (ParamsError, FileNotFoundError) as error:
        print(f"meddiff {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
