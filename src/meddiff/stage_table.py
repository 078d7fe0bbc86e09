"""The one stage table: every stage of meddiff, its data, params and platform needs, declared once.

Every shell is derived from :data:`STAGES`: the CLI subcommands and their ``--<x>-dir`` flags
(:mod:`meddiff.cli`), the Kubeflow components and the pipeline graph (``components/``, ``pipelines/``,
which wire each stage input to the output that carries the same :attr:`Port.data`), and the checks
that keep ``dvc.yaml`` true (``tests/test_dvc_yaml.py``). Adding a stage means adding one row here, a
library function, a component signature and a ``dvc.yaml`` entry; the tests name whatever is missing.

This module is declarative and imports nothing from meddiff, so the lowest layer (``config``) may read
the stage names. Stage functions are named by module path and imported only when a stage runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ArtifactKind(StrEnum):
    """The KFP artifact type a port travels as (``kfp.dsl.Dataset`` / ``Model`` / ``Artifact``)."""

    DATASET = "Dataset"
    MODEL = "Model"
    ARTIFACT = "Artifact"


@dataclass(frozen=True)
class Port:
    """One folder a stage reads or writes.

    Attributes:
        argument: keyword of the stage function (``report_dir``); the CLI flag is ``--report-dir`` and
            the KFP artifact is :attr:`artifact` (``report``).
        data: the global name of what the folder holds (``ingest_report``); a stage input is wired to
            the one output that carries the same ``data``.
        path: the ``params.paths`` attribute the folder defaults to.
        sub: sub-folder appended to that path ("" for none).
        kind: how the folder travels between Kubeflow tasks.
    """

    argument: str
    data: str
    path: str
    sub: str = ""
    kind: ArtifactKind = ArtifactKind.DATASET

    @property
    def artifact(self) -> str:
        """The KFP artifact (component parameter) name: the argument without ``_dir``."""
        return self.argument.removesuffix("_dir")


@dataclass(frozen=True)
class Resources:
    """Kubernetes requests/limits of a stage's pod (CPU in cores, memory as a quantity, whole GPUs)."""

    cpu_request: str
    memory_request: str
    memory_limit: str
    gpus: int = 0


#: the Kubeflow pipeline that trains (``meddiff``) and the one that predicts for new patients
MAIN_PIPELINE = "meddiff"
PREDICT_PIPELINE = "meddiff-predict"


class Caching(StrEnum):
    """KFP caching of a stage's task."""

    ALWAYS = "always"  # deterministic given its inputs
    WHEN_ASKED = "when_asked"  # only with ``pipeline.cache_training``: a retraining run must train again
    NEVER = "never"  # reads state outside its inputs (the model registry)


@dataclass(frozen=True)
class Stage:
    """One row of the stage table.

    Attributes:
        name: the CLI subcommand, DVC stage, KFP task and component name.
        module, function: where the library function ``function(params, **paths) -> result`` lives.
        summary: one line for ``--help`` and the docs.
        inputs, outputs: the folders it reads and writes (:class:`Port`).
        params: the ``params.yaml`` sections it reads (the DVC stage's ``params:``; ``paths`` is
            implied by the ports).
        resources: its pod on the cluster.
        retry: transient storage errors are worth a retry (I/O stages); compute stages repeat failures.
        caching: see :class:`Caching`.
        metrics_file: a file of an output port whose numeric leaves the KFP task also logs as its
            ``Output[Metrics]`` (``"report_dir/metrics.json"``), or "".
        in_pipeline: part of the main pipeline (DVC ``dvc.yaml`` and the KFP graph); commands such as
            the ablation suite are not.
        fetches: the input port (argument, ``raw_dir``) that a URI may fill instead of the stage that
            writes it (:mod:`meddiff.data.drop`): ``meddiff <stage> --raw-uri``, the key ``raw_uri`` of the
            stage's params section, the KFP pipeline parameter ``raw_uri``. The stage hashes what it read
            for that port, and the hash is the data version of every later stage; in the KFP graph the
            stages that write the port run only when no URI is given. "" for none.
        pipeline: the KFP pipeline whose graph holds an ``in_pipeline`` stage: :data:`MAIN_PIPELINE` or
            :data:`PREDICT_PIPELINE` (``dvc.yaml`` runs both, the main one first: :data:`DVC_STAGES`).
    """

    name: str
    module: str
    function: str
    summary: str
    inputs: tuple[Port, ...]
    outputs: tuple[Port, ...]
    params: tuple[str, ...]
    resources: Resources
    retry: bool = False
    caching: Caching = Caching.ALWAYS
    metrics_file: str = ""
    in_pipeline: bool = True
    fetches: str = ""
    pipeline: str = MAIN_PIPELINE
    #: the params section holding the URI's default when it is not the stage's own (``monitor`` reads the
    #: drop ``predict`` reads: ``predict.new_patients_uri``)
    uri_section: str = ""

    @property
    def ports(self) -> tuple[Port, ...]:
        return self.inputs + self.outputs

    @property
    def uri_argument(self) -> str:
        """The URI that may fill :attr:`fetches` (``raw_uri``): keyword, params key and KFP parameter; ""."""
        return f"{self.port(self.fetches).artifact}_uri" if self.fetches else ""

    @property
    def uri_params(self) -> str:
        """``section.key`` of the URI's default in params (``ingest.raw_uri``); "" when nothing is fetched."""
        return f"{self.uri_section or self.name}.{self.uri_argument}" if self.fetches else ""

    @property
    def gpus(self) -> int:
        return self.resources.gpus

    def port(self, argument: str) -> Port:
        for port in self.ports:
            if port.argument == argument:
                return port
        raise KeyError(f"stage {self.name!r} has no folder {argument!r}; it has {[p.argument for p in self.ports]}")


# The data every stage passes on (Port.data) and where it lives by default.
_RAW = Port("raw_dir", "raw", "raw")
_INTERIM = Port("interim_dir", "interim", "interim")
_QUARANTINE = Port("quarantine_dir", "quarantine", "quarantine")
_PROCESSED = Port("processed_dir", "processed", "processed")
_MODEL = Port("model_dir", "model", "models", kind=ArtifactKind.MODEL)
_SYNTHETIC = Port("synthetic_dir", "synthetic", "synthetic")
_EVALUATION = Port("evaluation_dir", "evaluate_report", "reports", "evaluate", ArtifactKind.ARTIFACT)
_EXPLANATION = Port("explanation_dir", "explain_report", "reports", "explain", ArtifactKind.ARTIFACT)
_DATA_CARD = Port("data_card_dir", "preprocess_report", "reports", "preprocess", ArtifactKind.ARTIFACT)
_NEW_PATIENTS = Port("new_patients_dir", "new_patients", "new_patients")
_EXTERNAL = Port("external_dir", "external", "external")
_EXTERNAL_PROCESSED = Port("external_processed_dir", "external_processed", "external_processed")


def _report(stage: str) -> Port:
    return Port("report_dir", f"{stage}_report", "reports", stage, ArtifactKind.ARTIFACT)


_SMALL = Resources("1", "2Gi", "4Gi")
_DATA = Resources("2", "4Gi", "8Gi")
_REPORT = Resources("2", "8Gi", "16Gi")

#: Every stage and command, in pipeline order. Resources are sized for the built-in cohort (400
#: patients, 32³ volumes); raise them with the cohort.
STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage(
            "cohort", "meddiff.data.cohort", "generate_cohort",
            "write the built-in synthetic cohort (DICOM, NIfTI masks, FHIR R4, notes)",
            inputs=(), outputs=(_RAW,), params=("seed", "dataset", "cohort"), resources=_SMALL, retry=True,
        ),
        Stage(
            "ingest", "meddiff.data.ingest", "run_ingest",
            "read, de-identify, validate (great-expectations) and quarantine raw records",
            inputs=(_RAW,), outputs=(_INTERIM, _QUARANTINE, _report("ingest")),
            params=("dataset", "ingest"), resources=_DATA, retry=True, fetches="raw_dir",
        ),
        Stage(
            "preprocess", "meddiff.data.preprocess", "run_preprocess",
            "MONAI transforms, note tokenizer, tabular scaling, stratified splits",
            inputs=(_INTERIM,), outputs=(_PROCESSED, _report("preprocess")),
            params=("seed", "dataset", "ingest", "preprocess"), resources=_DATA,
        ),
        Stage(
            "train", "meddiff.training.train", "run_train",
            "train the multimodal diffusion model; log and register it in MLflow",
            inputs=(_PROCESSED,), outputs=(_MODEL,), params=("seed", "dataset", "train", "monitor", "tracking"),
            resources=Resources("4", "16Gi", "32Gi", gpus=1), caching=Caching.WHEN_ASKED,
        ),
        Stage(
            "evaluate", "meddiff.evaluation.evaluate", "run_evaluate",
            "AUC/F1/accuracy with intervals on the test split, subgroups and under 0-80 %% modality masking",
            inputs=(_PROCESSED, _MODEL), outputs=(_report("evaluate"),),
            params=("seed", "evaluate", "tracking"), resources=_REPORT, metrics_file="report_dir/metrics.json",
        ),
        Stage(
            "generate", "meddiff.generation.generate", "run_generate",
            "sample class-conditional synthetic patients and measure their quality",
            inputs=(_PROCESSED, _MODEL), outputs=(_SYNTHETIC, _report("generate")),
            params=("seed", "dataset", "cohort", "ingest", "generate"), resources=_REPORT,
        ),
        Stage(
            "explain", "meddiff.explain.report", "run_explain",
            "attributions (attention, IG, Grad-CAM, occlusion) scored against lesion masks; HTML report",
            inputs=(_PROCESSED, _MODEL), outputs=(_report("explain"),),
            params=("seed", "explain", "tracking"), resources=_REPORT,
        ),
        Stage(
            "promote", "meddiff.evaluation.promote", "run_promote",
            "registry gate: alias `champion` moves to the new version only if it beats the champion",
            inputs=(_PROCESSED, _MODEL, _EVALUATION, _EXPLANATION, _DATA_CARD), outputs=(_report("promote"),),
            params=("promote", "train", "tracking"), resources=_REPORT, caching=Caching.NEVER,
        ),
        Stage(
            "external_drop", "meddiff.data.cohort_drops", "generate_external_drop",
            "write the labelled external-validation drop (another seed, ~2,000 patients)",
            inputs=(), outputs=(_EXTERNAL,), params=("seed", "dataset", "cohort", "drops"), resources=_SMALL,
            retry=True,
            in_pipeline=False,
        ),
        Stage(
            "external", "meddiff.evaluation.external", "run_external",
            "external validation: the model scored on an independent labelled drop (apply mode, nothing refitted)",
            inputs=(_EXTERNAL, _MODEL), outputs=(_EXTERNAL_PROCESSED, _report("external")),
            params=("seed", "dataset", "ingest", "preprocess", "evaluate", "tracking"), resources=_REPORT,
            metrics_file="report_dir/metrics.json", in_pipeline=False, fetches="external_dir",
            uri_section="evaluate",
        ),
        Stage(
            "suite", "meddiff.evaluation.suite", "run_suite",
            "ablations and baselines: same data, same budget, one table + summary (long: trains ~9 models)",
            inputs=(_PROCESSED, _EXTERNAL_PROCESSED),
            outputs=(Port("report_dir", "suite_report", "reports", "evaluate", ArtifactKind.ARTIFACT),),
            params=("seed", "dataset", "train", "evaluate", "tracking"), resources=_REPORT, in_pipeline=False,
        ),
        Stage(
            "new_patients", "meddiff.data.cohort_drops", "generate_new_patients",
            "write a small drop of new, unlabelled patients (another seed, modalities missing, one malformed)",
            inputs=(), outputs=(_NEW_PATIENTS,), params=("seed", "dataset", "cohort", "drops"), resources=_SMALL,
            retry=True,
            pipeline=PREDICT_PIPELINE,
        ),
        Stage(
            "predict", "meddiff.prediction.predict", "run_predict",
            "class probabilities + FHIR RiskAssessments for a raw drop of new patients (apply mode, the champion)",
            inputs=(_NEW_PATIENTS,), outputs=(_report("predict"),),
            params=("seed", "dataset", "ingest", "preprocess", "predict", "tracking"), resources=_REPORT,
            caching=Caching.NEVER,
            metrics_file="report_dir/metrics.json", pipeline=PREDICT_PIPELINE, fetches="new_patients_dir",
        ),
        Stage(
            "monitor", "meddiff.prediction.monitor", "run_monitor",
            "drift of a new drop against the model's training data (evidently) and whether to retrain",
            inputs=(_NEW_PATIENTS,), outputs=(_report("monitor"),),
            params=("seed", "dataset", "ingest", "preprocess", "predict", "monitor", "tracking"), resources=_REPORT,
            caching=Caching.NEVER,
            metrics_file="report_dir/metrics.json", pipeline=PREDICT_PIPELINE, fetches="new_patients_dir",
            uri_section="predict",
        ),
    )
}

#: The main pipeline's stages in order (the ``meddiff`` KFP graph; the start of ``dvc.yaml``).
PIPELINE_STAGES: tuple[str, ...] = tuple(
    name for name, stage in STAGES.items() if stage.in_pipeline and stage.pipeline == MAIN_PIPELINE
)
#: The prediction pipeline's stages in order (the ``meddiff-predict`` KFP graph).
PREDICT_STAGES: tuple[str, ...] = tuple(
    name for name, stage in STAGES.items() if stage.in_pipeline and stage.pipeline == PREDICT_PIPELINE
)
#: Every stage ``dvc.yaml`` runs, in order: the main pipeline, then prediction for the new patients.
DVC_STAGES: tuple[str, ...] = PIPELINE_STAGES + PREDICT_STAGES


def producers(stages: tuple[str, ...] = PIPELINE_STAGES) -> dict[str, tuple[str, Port]]:
    """``data`` name → (stage, output port) of the stage of ``stages`` (default: the main pipeline) that writes it.

    Raises:
        ValueError: two pipeline stages write the same data, or a stage reads data that no earlier
            stage writes (the graph would be ambiguous or broken).
    """
    written: dict[str, tuple[str, Port]] = {}
    for name in stages:
        stage = STAGES[name]
        for port in stage.inputs:
            if port.data not in written:
                raise ValueError(f"stage {name!r} reads {port.data!r}, which no earlier pipeline stage writes")
        for port in stage.outputs:
            if port.data in written:
                raise ValueError(f"{port.data!r} is written by both {written[port.data][0]!r} and {name!r}")
            written[port.data] = (name, port)
    return written
