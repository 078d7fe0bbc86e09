"""The Kubernetes manifests under ``infra/``: every overlay renders, validates offline, pins its images and
carries no real credentials.

``kubectl kustomize`` renders each overlay (kustomize v5 built into kubectl, no network needed);
``kubernetes-validate`` (next to the interpreter, schemas shipped in the wheel) validates every document
strictly against the Kubernetes version of the pinned kubectl. Where the kernel allows, the validator runs in
a network namespace of its own (``unshare -rn``), which proves it never reaches the network.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
OVERLAYS = ["dev", "gpu"]
#: kubectl here is v1.32 (infra/README.md); validate against the same minor version.
KUBERNETES_VERSION = "1.32.0"
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod", "ReplicaSet"}
PLACEHOLDER = re.compile(r"change-?me", re.IGNORECASE)
SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|_KEY$", re.IGNORECASE)
REAL_LOOKING = [
    re.compile(r"AKIA[0-9A-Z]{16}"),  # AWS access key id
    re.compile(r"^[A-Za-z0-9/+]{40}$"),  # AWS secret access key shape
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"^(minioadmin|admin|password|postgres|secret)$", re.IGNORECASE),  # well-known defaults
]


def _kubectl() -> str:
    found = shutil.which("kubectl")
    if not found:
        pytest.skip("kubectl not on PATH")
    return found


def _validator() -> str:
    path = Path(sys.executable).parent / "kubernetes-validate"
    if not path.is_file():
        pytest.fail(f"{path}: kubernetes-validate not installed in the venv (requirements-dev.txt)")
    return str(path)


@cache
def _offline_prefix() -> tuple[str, ...]:
    """``unshare -rn`` (a user + network namespace with no interfaces) when the kernel allows it."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-rn", "true"], capture_output=True, timeout=10).returncode == 0:
        return (unshare, "-rn")
    return ()


@cache
def render(overlay: str) -> str:
    result = subprocess.run(
        [_kubectl(), "kustomize", str(INFRA / "overlays" / overlay)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, f"kubectl kustomize {overlay} failed:\n{result.stderr}"
    return result.stdout


def documents(overlay: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(render(overlay)) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "Pod":
        return doc["spec"]
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(doc)
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_offline(overlay: str, tmp_path: Path) -> None:
    rendered = tmp_path / f"{overlay}.yaml"
    rendered.write_text(render(overlay))
    result = subprocess.run(
        [*_offline_prefix(), _validator(), "--strict", "--quiet", "--kubernetes-version", KUBERNETES_VERSION,
         str(rendered)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "NO_PROXY": "*"},
    )
    assert result.returncode == 0, f"{overlay} does not validate:\n{result.stdout}\n{result.stderr}"
    assert "did not validate" not in result.stdout + result.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_image_is_pinned(overlay: str) -> None:
    images = []
    for doc in documents(overlay):
        if doc["kind"] in WORKLOAD_KINDS:
            images += [(doc["metadata"]["name"], c["image"]) for c in containers(doc)]
    assert images
    for name, image in images:
        reference = image.split("@", 1)[0]
        repository, _, tag = reference.rpartition(":")
        assert "@sha256:" in image or (tag and "/" not in tag and repository), f"{name}: {image} has no tag"
        assert tag.lower() not in {"latest", "stable", "main", "master", "edge"}, f"{name}: {image} is not pinned"
        assert re.search(r"\d", tag), f"{name}: {image}: a tag without a version number is not a pin"
    # the MLflow server image follows the mlflow pin of requirements.txt
    pin = re.search(r"^mlflow==(\S+)$", (REPO / "requirements.txt").read_text(), re.MULTILINE)
    assert pin
    assert f"ghcr.io/meddiff/mlflow-server:{pin.group(1)}" in {image for _, image in images}
    dockerfile = (INFRA / "images" / "mlflow-server" / "Dockerfile").read_text()
    assert f"ghcr.io/mlflow/mlflow:v{pin.group(1)}" in dockerfile


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_hold_no_real_credentials(overlay: str) -> None:
    secrets = [doc for doc in documents(overlay) if doc["kind"] == "Secret"]
    if overlay == "gpu":
        assert not secrets, "the cloud overlay must not render Secrets: they are created out of band"
        return
    assert {s["metadata"]["name"] for s in secrets} == {
        "meddiff-credentials", "mlflow-db", "mlflow-auth", "object-store-root"
    }
    for secret in secrets:
        values = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
        values.update(secret.get("stringData", {}))
        assert values
        for key, value in values.items():
            where = f"{secret['metadata']['name']}.{key}"
            if SECRET_KEY.search(key):
                assert PLACEHOLDER.search(value), f"{where}: a secret value that is not a CHANGE-ME placeholder"
            for pattern in REAL_LOOKING:
                assert not pattern.search(value), f"{where}: {value!r} looks like a real or default credential"


def test_secret_templates_are_placeholders_only() -> None:
    templates = sorted((INFRA / "base" / "secrets").glob("*.env.example"))
    assert len(templates) == 4
    for template in templates:
        for line in template.read_text().splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            key, _, value = line.partition("=")
            if SECRET_KEY.search(key):
                assert PLACEHOLDER.search(value), f"{template.name}: {key} is not a placeholder"
    # filled copies (*.env) next to the templates are git-ignored
    assert "*.env" in (INFRA / "base" / "secrets" / ".gitignore").read_text().split()
    ignored = subprocess.run(["git", "check-ignore", "-q", str(INFRA / "base" / "secrets" / "mlflow-db.env")],
                             cwd=REPO, capture_output=True, timeout=30)
    assert ignored.returncode in (0, 128)  # 0: ignored; 128: not a git checkout (e.g. an sdist)


def test_names_the_pipeline_relies_on() -> None:
    """Names shared with pipelines/pipeline.py and the README plan: Services, Secret, SA, namespaces."""
    docs = documents("dev")
    services = by_kind(docs, "Service")
    ports = {name: {p["port"] for p in s["spec"]["ports"]} for name, s in services.items()}
    assert ports["mlflow"] == {5000} and 9000 in ports["object-store"] and ports["mlflow-db"] == {5432}
    assert {s["metadata"]["namespace"] for s in services.values()} == {"meddiff"}
    credentials = by_kind(docs, "Secret")["meddiff-credentials"]
    assert credentials["metadata"]["namespace"] == "kubeflow"
    from meddiff_pipelines.pipeline import CREDENTIAL_KEYS, CREDENTIALS_SECRET

    assert credentials["metadata"]["name"] == CREDENTIALS_SECRET
    assert set(CREDENTIAL_KEYS) <= set(credentials["data"])
    sa = by_kind(docs, "ServiceAccount")["meddiff-pipeline-runner"]
    binding = by_kind(docs, "RoleBinding")["meddiff-pipeline-runner"]
    assert sa["metadata"]["namespace"] == binding["metadata"]["namespace"] == "kubeflow"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "meddiff-pipeline-runner",
                                    "namespace": "kubeflow"}]
    cluster_kinds = {"ClusterRole", "ClusterRoleBinding"}
    cluster_rbac = {(d["kind"], d["metadata"]["name"]) for d in docs if d["kind"] in cluster_kinds}
    # namespaced, but for reading ClusterTrainingRuntimes (test_trainjob_rbac)
    assert cluster_rbac == {(kind, TRAININGRUNTIME_READER) for kind in cluster_kinds}
    role = by_kind(docs, "Role")["meddiff-pipeline-runner"]
    secret_rules = [r for r in role["rules"] if "secrets" in r["resources"]]
    assert all(r.get("resourceNames") and r["verbs"] == ["get"] for r in secret_rules)
    mlflow = by_kind(docs, "Deployment")["mlflow"]
    args = pod_spec(mlflow)["containers"][0]["args"]
    assert args[args.index("--artifacts-destination") + 1] == "s3://mlflow/"
    assert args[args.index("--backend-store-uri") + 1].endswith("@mlflow-db:5432/mlflow")
    assert args[args.index("--workers") + 1] == "1"  # the dev patch hit the right argument
    assert services["mlflow"]["spec"]["type"] == "NodePort"


TRAININGRUNTIME_READER = "meddiff-trainingruntime-reader"


def _allows(rules: list[dict[str, Any]], group: str, resource: str, verb: str) -> bool:
    return any(
        group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"] for rule in rules
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_trainjob_rbac(overlay: str) -> None:
    """The runner may submit, follow and replace TrainJobs, read their pods' logs and events, and read the
    ClusterTrainingRuntimes (read-only, that one resource, bound to the runner alone); nothing else
    cluster-wide. The shared training volume exists in the runner's namespace under the params' name."""
    from meddiff.config import PipelineConfig

    docs = documents(overlay)
    rules = by_kind(docs, "Role")["meddiff-pipeline-runner"]["rules"]
    for verb in ("create", "get", "list", "watch", "delete"):
        assert _allows(rules, "trainer.kubeflow.org", "trainjobs", verb), verb
    assert _allows(rules, "trainer.kubeflow.org", "trainingruntimes", "get")
    assert _allows(rules, "", "pods", "list") and _allows(rules, "", "pods/log", "get")
    assert _allows(rules, "", "events", "list")
    assert not _allows(rules, "trainer.kubeflow.org", "trainjobs", "update")  # nothing it does not use
    reader = by_kind(docs, "ClusterRole")[TRAININGRUNTIME_READER]
    assert reader["rules"] == [
        {"apiGroups": ["trainer.kubeflow.org"], "resources": ["clustertrainingruntimes"], "verbs": ["get", "list"]}
    ]
    binding = by_kind(docs, "ClusterRoleBinding")[TRAININGRUNTIME_READER]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": TRAININGRUNTIME_READER}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": PipelineConfig().service_account,
                                    "namespace": "kubeflow"}]
    claim = by_kind(docs, "PersistentVolumeClaim")[PipelineConfig().shared_volume]
    assert claim["metadata"]["namespace"] == "kubeflow"
    assert claim["spec"]["accessModes"] == (["ReadWriteOnce"] if overlay == "dev" else ["ReadWriteMany"])


def test_gpu_overlay_targets_the_gpu_pool() -> None:
    from meddiff.config import PipelineConfig

    gpu_selector = PipelineConfig().gpu_node_selector  # the selector the pipeline gives the train task
    docs = documents("gpu")
    gpu_workloads = [d for d in docs if d["kind"] in WORKLOAD_KINDS
                     and d["metadata"].get("labels", {}).get("meddiff.io/accelerator") == "nvidia-gpu"]
    assert {d["metadata"]["name"] for d in gpu_workloads} == {"nvidia-device-plugin-daemonset", "gpu-smoke"}
    for workload in gpu_workloads:
        spec = pod_spec(workload)
        assert spec["nodeSelector"] == gpu_selector, workload["metadata"]["name"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    smoke = by_kind(docs, "Job")["gpu-smoke"]
    assert containers(smoke)[0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    plugin = by_kind(docs, "DaemonSet")["nvidia-device-plugin-daemonset"]
    assert plugin["metadata"]["namespace"] == "kube-system"
    # nothing else is pinned to GPU nodes, and the dev overlay has no GPU workload at all
    others = [d for d in docs if d["kind"] in WORKLOAD_KINDS and d not in gpu_workloads]
    assert others and not [d for d in others if "nodeSelector" in pod_spec(d)]
    assert not [d for d in documents("dev") if "nvidia" in str(d)]
    sizes = {d["metadata"]["name"]: d for d in docs if d["kind"] == "StatefulSet"}
    storage = sizes["object-store"]["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    assert storage == "500Gi"
    assert by_kind(docs, "Deployment")["mlflow"]["spec"]["replicas"] == 2


def test_mlflow_server_dockerfile_is_lint_clean() -> None:
    venv_bin = str(Path(sys.executable).parent)
    hadolint = shutil.which("hadolint", path=os.pathsep.join([venv_bin, os.environ.get("PATH", "")]))
    if not hadolint:
        pytest.skip("hadolint not installed")
    dockerfile = INFRA / "images" / "mlflow-server" / "Dockerfile"
    result = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
