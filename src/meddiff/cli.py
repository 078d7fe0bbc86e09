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
from meddiff.stage_table import PIPELINE_STAGES, STAGES

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
        "Stages run in order: " + " → ".join(PIPELINE_STAGES) + ".",
    )
    parser.add_argument("--version", action="version", version=f"meddiff {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    for spec in STAGES.values():
        stage_parser = commands.add_parser(spec.name, help=spec.summary, description=spec.summary)
        _add_common(stage_parser)
        for port in spec.ports:
            flag = "--" + port.argument.replace("_", "-")
            default_text = f"params paths.{port.path}" + (f" / {port.sub}" if port.sub else "")
            stage_parser.add_argument(flag, dest=port.argument, default=None, help=f"default: {default_text}")
        if spec.fetches:
            stage_parser.add_argument(
                "--" + spec.uri_argument.replace("_", "-"), dest=spec.uri_argument, default=None,
                help=f"raw drop to read instead of --{spec.fetches.replace('_', '-')}: s3://bucket/prefix, "
                f"dvc://<repo>?path=<path>&rev=<rev> or a folder (default: params {spec.uri_params})",
            )

    _add_ingest_shards(commands)
    _add_preprocess_shards(commands)
    _add_pipeline(commands)
    return parser


def _add_ingest_shards(commands: argparse._SubParsersAction) -> None:
    """``ingest --shard i/n`` and ``ingest-merge --shards n`` (logic: meddiff.data.ingest.shard)."""
    commands.choices["ingest"].add_argument(
        "--shard", default=None, metavar="I/N",
        help="ingest only shard I of N (0-based; patients by SHA-256 of the raw id; records without a patient: "
        "shard 0); outputs go to <folder>-shard-I-of-N; merge them with `meddiff ingest-merge --shards N`",
    )
    merge = commands.add_parser(
        "ingest-merge", help="merge the outputs of `ingest --shard i/N` (i = 0…N-1) into one ingest's outputs",
        description="Merge the N shard outputs of `meddiff ingest --shard i/N` (read from <folder>-shard-i-of-N) "
        "into the interim, quarantine and report folders of one unsharded ingest (docs/data.md).",
    )
    _add_common(merge)
    merge.add_argument("--shards", type=int, required=True, metavar="N", help="the shard count N")
    for argument in ("interim_dir", "quarantine_dir", "report_dir"):
        merge.add_argument("--" + argument.replace("_", "-"), dest=argument, default=None,
                           help="merged output (default: as `meddiff ingest`); shards are read from its "
                           "-shard-i-of-N siblings")


def _add_preprocess_shards(commands: argparse._SubParsersAction) -> None:
    """``preprocess --shard i/n`` and ``preprocess --merge <shard folders>`` (logic: meddiff.data.preprocess)."""
    preprocess = commands.choices["preprocess"]
    preprocess.add_argument(
        "--shard", dest="preprocess_shard", default=None, metavar="I/N",
        help="run only the images of shard I of N (0-based; patients by SHA-256 of the manifest's patient_id) "
        "into --processed-dir, a shard folder (--report-dir is not written); combine them with --merge",
    )
    preprocess.add_argument(
        "--merge", dest="preprocess_merge", nargs="+", default=None, metavar="SHARD_DIR",
        help="the folders of `preprocess --shard i/N` for i = 0…N-1: fit splits, tokenizer and scaler on the whole "
        "manifest and take the volumes from the shards (hard-linked) instead of running the images",
    )


def _add_pipeline(commands: argparse._SubParsersAction) -> None:
    """``meddiff pipeline compile | submit | schedule | run`` (logic: meddiff_pipelines)."""
    pipeline = commands.add_parser(
        "pipeline", help="Kubeflow Pipelines: compile, submit, schedule or run locally",
        description="Kubeflow Pipelines (KFP v2). Parameters come from --params plus --set overrides; "
        "see docs/kubeflow.md.",
    )
    actions = pipeline.add_subparsers(dest="pipeline_command", metavar="ACTION", required=True)
    compile_parser = actions.add_parser("compile", help="compile the KFP v2 pipeline to YAML")
    compile_parser.add_argument("--output", required=True, help="pipeline YAML to write")
    compile_parser.add_argument("--predict", action="store_true",
                                help="compile the meddiff-predict pipeline (batch prediction for new patients)")
    submit = actions.add_parser("submit", help="upload a pipeline version named after the git commit and start a run")
    submit.add_argument("--run-name", default=None, help="default: meddiff-<commit>-<UTC time>")
    schedule = actions.add_parser(
        "schedule", help="create a recurring run (6-field cron, one at a time, no catch-up) for retraining"
    )
    schedule.add_argument(
        "--cron", default=None, help="6-field cron 's m h dom mon dow' (default: pipeline.schedule_cron)"
    )
    schedule.add_argument("--name", default="meddiff-retraining", help="recurring run name (default: %(default)s)")
    schedule.add_argument("--replace", action="store_true", help="delete a recurring run of the same name first")
    run = actions.add_parser("run", help="run the whole pipeline on this machine with kfp.local")
    run.add_argument("--runner", choices=("subprocess", "docker"), default="subprocess",
                     help="subprocess: this interpreter; docker: the stage images (default: %(default)s)")
    run.add_argument("--pipeline-root", default="local_outputs", help="where outputs go (default: %(default)s)")
    run.add_argument("--docker-timeout", type=float, default=5.0, help="seconds the Docker engine has to answer")
    for action in (compile_parser, submit, schedule, run):
        _add_common(action)
        action.add_argument(
            "--image", default=None, help="stage image (default: MEDDIFF_IMAGE or the versioned project image)"
        )
        action.add_argument(
            "--gpu-image", default=None, help="train image (default: MEDDIFF_GPU_IMAGE, else --image, else -cuda tag)"
        )
        action.add_argument(
            "--raw-uri", default=None, help="raw drop the run reads: s3://bucket/prefix or dvc://<repo>?path=…&rev=…; "
            "\"\" runs the built-in cohort (default: params ingest.raw_uri)"
        )
    for action in (submit, schedule):
        action.add_argument("--host", default=None, help="KFP API endpoint (default: $KFP_HOST); token: $KFP_TOKEN")
        action.add_argument("--namespace", default=None, help="multi-user KFP namespace (default: pipeline.namespace)")
        action.add_argument("--experiment", default=None, help="KFP experiment (default: pipeline.experiment)")


def _load(args: argparse.Namespace):  # -> Params; the import stays out of module start-up
    from meddiff.config import apply_overrides, load_params

    params = load_params(args.params)
    return apply_overrides(params, args.overrides) if args.overrides else params


def _run_stage(args: argparse.Namespace) -> int:
    from meddiff.stages import result_to_dict, run_versioned

    params = _load(args)
    spec = STAGES[args.command]
    paths = {port.argument: getattr(args, port.argument) for port in spec.ports}
    uri = getattr(args, spec.uri_argument) if spec.fetches else None
    options = None
    if getattr(args, "shard", None):  # ingest --shard i/n: outputs go to the shard's own sibling folders
        from meddiff.data.ingest.shard import Shard, shard_output_folders

        try:
            options = {"shard": Shard.parse(args.shard)}
        except ValueError as error:
            print(f"meddiff {args.command}: error: {error}", file=sys.stderr)
            return 2
        from meddiff.stages import default_paths

        defaults = default_paths(params, args.command)
        outputs = {port.argument: Path(paths[port.argument] or defaults[port.argument]) for port in spec.outputs}
        paths.update(shard_output_folders(options["shard"], outputs))
    if getattr(args, "preprocess_shard", None) or getattr(args, "preprocess_merge", None):
        options = {"shard": args.preprocess_shard, "merge": [Path(m) for m in args.preprocess_merge or ()]}
    started = time.perf_counter()
    result, data_version = run_versioned(args.command, params, uri=uri, options=options, **paths)
    LOG.info("%s finished in %.1f s", args.command, time.perf_counter() - started)
    payload = result_to_dict(result)
    if spec.fetches:  # the hash of the drop read: the data version of every later stage
        payload["data_version"] = data_version
    print(json.dumps(payload, indent=2, default=str))
    return 0


def _run_ingest_merge(args: argparse.Namespace) -> int:
    from meddiff.data.ingest.shard import merge_ingest_shards
    from meddiff.stages import default_paths, result_to_dict

    defaults = default_paths(_load(args), "ingest")  # the merged folders: as `meddiff ingest` writes them
    folders = {key: Path(getattr(args, key) or defaults[key])
               for key in ("interim_dir", "quarantine_dir", "report_dir")}
    result = merge_ingest_shards(args.shards, **folders)
    print(json.dumps(result_to_dict(result), indent=2, default=str))
    return 0


def _run_pipeline(args: argparse.Namespace) -> int:
    params = _load(args)
    images = {"image": args.image, "gpu_image": args.gpu_image, "raw_uri": args.raw_uri}
    if args.pipeline_command == "compile" and args.predict:
        from meddiff_pipelines.predict import compile_predict_pipeline

        print(f"wrote {compile_predict_pipeline(params, Path(args.output), image=args.image)}")
        return 0
    if args.pipeline_command == "compile":
        from meddiff_pipelines.pipeline import compile_pipeline

        output = compile_pipeline(params, Path(args.output), **images)
        print(f"wrote {output}")
        return 0

    from meddiff_pipelines import client, local

    try:
        if args.pipeline_command == "run":
            result = local.run_local(
                params, runner=args.runner, pipeline_root=args.pipeline_root,
                docker_timeout=args.docker_timeout, **images,
            )
        else:
            endpoint = {"host": args.host, "namespace": args.namespace, "experiment": args.experiment}
            if args.pipeline_command == "submit":
                result = client.submit(params, **endpoint, run_name=args.run_name, **images)
            else:
                result = client.schedule(
                    params, **endpoint, name=args.name, cron=args.cron, replace=args.replace, **images
                )
    except (client.KfpError, local.DockerUnavailableError, ValueError) as error:
        print(f"meddiff pipeline {args.pipeline_command}: error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(result.to_dict(), indent=2))
    return 0


def configure_logging(verbose: bool) -> None:
    """meddiff's own messages at INFO (DEBUG with ``-v``); other libraries' only from WARNING up, so that
    their INFO chatter (great-expectations registers ~200 functions at import) stays out of stage logs."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    LOG.setLevel(logging.DEBUG if verbose else logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    from meddiff.errors import UserError

    try:
        if args.command == "pipeline":
            return _run_pipeline(args)
        if args.command == "ingest-merge":
            return _run_ingest_merge(args)
        return _run_stage(args)
    except (UserError, FileNotFoundError) as error:
        print(f"meddiff {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
