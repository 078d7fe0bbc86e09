"""Who gets in, on the rendered ``infra/`` overlays: the MLflow server runs MLflow's basic-auth app with its
credentials from Secrets, and the NetworkPolicies admit to PostgreSQL, MinIO and MLflow exactly the pods that
need them (the pipeline's pods, the MLflow server, the bucket Job), nothing else.

The policies are evaluated with the NetworkPolicy rules of the Kubernetes API (a pod selected by no policy
accepts everything; a selected pod accepts a connection only when some rule of a selecting policy matches the
peer and the port; ``namespaceSelector`` and ``podSelector`` of one peer must both match) against the pods the
overlays actually render (their pod-template labels and container ports), so a renamed label or port fails
here. Schema validation of the same output is ``test_kustomize.py::test_overlay_validates_offline``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from meddiff_components.trainjob import CREDENTIAL_KEYS, PIPELINE_POD_LABELS

from .test_kustomize import INFRA, OVERLAYS, WORKLOAD_KINDS, by_kind, containers, documents, pod_spec

SERVICES_NAMESPACE = "meddiff"
AUTH_SECRET = "mlflow-auth"
AUTH_SECRET_KEYS = {"MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"}
AUTH_DATABASE = "mlflow_auth"
#: The rendered name of a generated ConfigMap carries a content hash: ``<name>-<hash>``.
AUTH_SCRIPT_CONFIG_MAP = "mlflow-auth-config"
INITDB_CONFIG_MAP = "mlflow-db-initdb"
#: A connection from outside the cluster's pods (the node of a NodePort, a laptop through a load balancer).
OUTSIDE = None


@dataclass
class Pod:
    name: str  # for the test's messages and expectations only; policies see namespace and labels
    namespace: str
    labels: dict[str, str] = field(default_factory=dict)


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (``{}`` selects everything)."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        matched = {
            "In": present and labels.get(key) in values,
            "NotIn": not present or labels.get(key) not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }[operator]
        if not matched:
            return False
    return True


def _namespace_labels(namespace: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": namespace}  # set by the API server on every namespace (≥ 1.21)


def _peer_matches(peer: dict[str, Any], source: Pod | None, policy_namespace: str) -> bool:
    if source is OUTSIDE:
        return "ipBlock" in peer and peer["ipBlock"]["cidr"] in {"0.0.0.0/0", "::/0"}
    if "ipBlock" in peer:
        return False  # pod IPs are not pinned by these manifests: an ipBlock is never how a pod gets in
    if "namespaceSelector" in peer:
        in_namespace = _selects(peer["namespaceSelector"], _namespace_labels(source.namespace))
    else:
        in_namespace = source.namespace == policy_namespace
    return in_namespace and _selects(peer.get("podSelector", {}), source.labels)


def _port_matches(rule: dict[str, Any], port: int) -> bool:
    ports = rule.get("ports")
    if not ports:
        return True
    for entry in ports:
        if entry.get("protocol", "TCP") != "TCP":
            continue
        if isinstance(entry.get("port"), str):
            raise ValueError(f"named port {entry['port']!r}: resolve it against the pod before using this check")
        if "port" not in entry or entry["port"] <= port <= entry.get("endPort", entry["port"]):
            return True
    return False


def allowed(docs: list[dict[str, Any]], source: Pod | None, target: Pod, port: int) -> bool:
    """Whether the NetworkPolicies in ``docs`` let ``source`` open a TCP connection to ``target``:``port``."""
    policies = [
        d for d in docs
        if d["kind"] == "NetworkPolicy" and d["metadata"]["namespace"] == target.namespace
        and "Ingress" in d["spec"].get("policyTypes", ["Ingress"]) and _selects(d["spec"]["podSelector"], target.labels)
    ]
    if not policies:
        return True
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from")
            peer_ok = not peers or any(_peer_matches(p, source, target.namespace) for p in peers)
            if peer_ok and _port_matches(rule, port):
                return True
    return False


def workload_pod(docs: list[dict[str, Any]], name: str) -> Pod:
    """The pod a rendered workload creates (its namespace and pod-template labels)."""
    (workload,) = [d for d in docs if d["kind"] in WORKLOAD_KINDS and d["metadata"]["name"] == name]
    return Pod(name, workload["metadata"]["namespace"], workload["spec"]["template"]["metadata"]["labels"])


def container_ports(docs: list[dict[str, Any]], name: str) -> dict[str, int]:
    (workload,) = [d for d in docs if d["kind"] in WORKLOAD_KINDS and d["metadata"]["name"] == name]
    return {p["name"]: p["containerPort"] for c in containers(workload) for p in c.get("ports", [])}


def runner_namespace(docs: list[dict[str, Any]]) -> str:
    return by_kind(docs, "ServiceAccount")["meddiff-pipeline-runner"]["metadata"]["namespace"]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


def _secret_ref(item: dict[str, Any]) -> tuple[str, str]:
    assert "value" not in item, f"{item['name']} is a literal in the manifest, not a Secret reference"
    ref = item["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


# --------------------------------------------------------------------------------------------------
# MLflow authentication


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_runs_with_basic_auth_from_secrets(overlay: str) -> None:
    docs = documents(overlay)
    deployment = by_kind(docs, "Deployment")["mlflow"]
    spec = pod_spec(deployment)
    (server,) = spec["containers"]
    args = server["args"]
    assert server["command"] == ["mlflow"] and args[0] == "server"
    assert args[args.index("--app-name") + 1] == "basic-auth"
    env = env_of(server)
    # the admin user and the CSRF key: from the Secret mlflow-auth, never literal
    for key in AUTH_SECRET_KEYS:
        assert _secret_ref(env[key]) == (AUTH_SECRET, key)
    # every credential-like variable of every container (init included) comes from a Secret
    for container in containers(deployment):
        for name, item in env_of(container).items():
            if any(word in name for word in ("PASSWORD", "SECRET", "USERNAME", "ACCESS_KEY")):
                assert "valueFrom" in item and "secretKeyRef" in item["valueFrom"], f"{container['name']}.{name}"
    # the INI the server reads is the file the init container writes, on a volume both mount
    config_path = Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"])
    (init,) = spec["initContainers"]
    assert init["command"][-1] == str(config_path)
    mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    init_mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    shared = [name for name, path in mounts.items() if Path(path) == config_path.parent]
    assert shared and init_mounts[shared[0]] == mounts[shared[0]]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[shared[0]]["emptyDir"]["medium"] == "Memory"  # the file holds the database password
    # the init container runs the script of infra/base/mlflow, shipped as a generated ConfigMap
    script_volume = next(name for name, path in init_mounts.items() if init["command"][1].startswith(path + "/"))
    config_map = volumes[script_volume]["configMap"]["name"]
    assert config_map.startswith(AUTH_SCRIPT_CONFIG_MAP + "-")
    shipped = by_kind(docs, "ConfigMap")[config_map]["data"]["auth_config.py"]
    assert shipped == (INFRA / "base" / "mlflow" / "auth_config.py").read_text()
    # the user store: database mlflow_auth on the same PostgreSQL, password by reference
    init_env = env_of(init)
    uri = init_env["MLFLOW_AUTH_DATABASE_URI"]["value"]
    assert uri == f"postgresql+psycopg://$(POSTGRES_USER):$(POSTGRES_PASSWORD)@mlflow-db:5432/{AUTH_DATABASE}"
    names = list(init_env)
    assert names.index("POSTGRES_PASSWORD") < names.index("MLFLOW_AUTH_DATABASE_URI")  # $(…) needs it first
    assert _secret_ref(init_env["POSTGRES_PASSWORD"]) == ("mlflow-db", "POSTGRES_PASSWORD")
    assert init_env["MLFLOW_AUTH_DEFAULT_PERMISSION"]["value"] == "NO_PERMISSIONS"
    # PostgreSQL creates that database when it initialises its volume
    postgres = by_kind(docs, "StatefulSet")["mlflow-db"]
    (db,) = pod_spec(postgres)["containers"]
    initdb_mount = next(m for m in db["volumeMounts"] if m["mountPath"] == "/docker-entrypoint-initdb.d")
    initdb_volume = next(v for v in pod_spec(postgres)["volumes"] if v["name"] == initdb_mount["name"])
    initdb = by_kind(docs, "ConfigMap")[initdb_volume["configMap"]["name"]]
    assert initdb["metadata"]["name"].startswith(INITDB_CONFIG_MAP + "-")
    assert f"CREATE DATABASE {AUTH_DATABASE};" in "".join(initdb["data"].values())


def test_auth_secret_template_and_client_credentials() -> None:
    """The dev overlay's mlflow-auth Secret carries exactly the keys the server reads; the pipeline's tasks get a
    user to send (the same key list the tasks and TrainJob nodes map, components/trainjob.py)."""
    docs = documents("dev")
    secrets = by_kind(docs, "Secret")
    assert secrets[AUTH_SECRET]["metadata"]["namespace"] == SERVICES_NAMESPACE
    assert set(secrets[AUTH_SECRET]["data"]) == AUTH_SECRET_KEYS
    assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(CREDENTIAL_KEYS)
    assert set(secrets["meddiff-credentials"]["data"]) == set(CREDENTIAL_KEYS)


# --------------------------------------------------------------------------------------------------
# NetworkPolicies


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_admit_only_who_needs_the_stores(overlay: str) -> None:
    docs = documents(overlay)
    policies = by_kind(docs, "NetworkPolicy")
    deny = policies["default-deny-ingress"]
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}  # no rule: nothing gets in
    assert {p["metadata"]["namespace"] for p in policies.values()} == {SERVICES_NAMESPACE}

    mlflow, database, store = (workload_pod(docs, n) for n in ("mlflow", "mlflow-db", "object-store"))
    buckets = workload_pod(docs, "object-store-buckets")
    ports = {n: container_ports(docs, n) for n in ("mlflow", "mlflow-db", "object-store")}
    mlflow_port, db_port = ports["mlflow"]["http"], ports["mlflow-db"]["postgres"]
    s3_port, console_port = ports["object-store"]["s3"], ports["object-store"]["console"]
    pipeline_namespace = runner_namespace(docs)
    pipeline = Pod("pipeline", pipeline_namespace,
                   {**PIPELINE_POD_LABELS, "workflows.argoproj.io/workflow": "meddiff-x"})

    who_may = {
        ("pipeline", "mlflow", mlflow_port), ("pipeline", "object-store", s3_port),
        ("mlflow", "mlflow-db", db_port), ("mlflow", "object-store", s3_port),
        ("object-store-buckets", "object-store", s3_port),
    }
    strangers = [
        Pod("kfp-neighbour", pipeline_namespace),  # another pod of the KFP namespace (UI, another pipeline)
        Pod("part-of-meddiff", pipeline_namespace, {"app.kubernetes.io/part-of": "meddiff"}),
        Pod("wrong-namespace", "default", dict(PIPELINE_POD_LABELS)),  # the right label, the wrong namespace
        Pod("debug", SERVICES_NAMESPACE, {"app.kubernetes.io/name": "debug"}),
    ]
    sources = [pipeline, mlflow, buckets, database, store, *strangers]
    targets = [(mlflow, mlflow_port), (database, db_port), (store, s3_port), (store, console_port)]
    for source in sources:
        for target, port in targets:
            # dev opens MLflow's port to everyone for its NodePort UI: basic-auth is the gate there
            expected = (source.name, target.name, port) in who_may or (overlay == "dev" and target is mlflow)
            assert allowed(docs, source, target, port) is expected, (source.name, target.name, port)
    # from outside the pods: only the dev overlay's NodePort UI (basic-auth asks for a user there)
    assert allowed(docs, OUTSIDE, mlflow, mlflow_port) is (overlay == "dev")
    for target, port in targets[1:]:
        assert not allowed(docs, OUTSIDE, target, port)


def test_pipeline_pods_carry_the_label_the_policies_admit(tmp_path: Path) -> None:
    """Every compiled task of both pipelines (pod metadata in the KFP platform spec) and every TrainJob node (pod
    template patch) is labelled with PIPELINE_POD_LABELS, the label the policies' peers select."""
    import yaml
    from meddiff_components.trainjob import SharedRun, build_trainjob, trainjob_name
    from meddiff_pipelines.pipeline import compile_pipeline
    from meddiff_pipelines.predict import compile_predict_pipeline

    from meddiff.config import apply_overrides, load_params

    params = load_params(INFRA.parent / "params.yaml")
    for compile_ in (compile_pipeline, compile_predict_pipeline):
        compiled = compile_(params, tmp_path / f"{compile_.__name__}.yaml")
        _, platform = yaml.safe_load_all(compiled.read_text())
        executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        assert executors
        for name, config in executors.items():
            assert config["podMetadata"]["labels"] == PIPELINE_POD_LABELS, (compile_.__name__, name)

    distributed = apply_overrides(params, ["train.nodes=2", "train.gpus_per_node=2"])
    run_key = "0123456789abcdef"
    request = build_trainjob(distributed, "img:1", SharedRun.for_params(distributed, trainjob_name(run_key)), run_key)
    patches = [o for o in request.options if hasattr(o, "training_runtime_spec")]
    (node,) = patches[0].training_runtime_spec.template.spec.replicated_jobs
    assert node.template.spec.template.metadata == {"labels": PIPELINE_POD_LABELS}

    for policy_name in ("mlflow-ingress", "object-store-ingress"):
        policy = by_kind(documents("gpu"), "NetworkPolicy")[policy_name]
        peers = [p for rule in policy["spec"]["ingress"] for p in rule.get("from", []) if "namespaceSelector" in p]
        assert [p["podSelector"]["matchLabels"] for p in peers] == [PIPELINE_POD_LABELS], policy_name


def _module_from_file(name: str, path: Path) -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mlflow_auth_config_reader() -> Any:
    """``mlflow/server/auth/config.py`` of the pinned MLflow, loaded from its file: the package's ``__init__``
    imports Flask-WTF, which the venv need not have, while the reader itself needs only the standard library."""
    import mlflow

    return _module_from_file("mlflow_auth_config", Path(mlflow.__file__).parent / "server" / "auth" / "config.py")


def test_auth_config_script_writes_what_mlflow_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The init container's script: MLflow's own reader gets the URI back unchanged (a percent-encoded password
    survives configparser's interpolation), the file is private, and a missing setting stops the pod."""
    read_auth_config = _mlflow_auth_config_reader().read_auth_config
    script = _module_from_file("auth_config", INFRA / "base" / "mlflow" / "auth_config.py")
    uri = "postgresql+psycopg://mlflow:p%40ss%25word@mlflow-db:5432/mlflow_auth"
    path = tmp_path / "etc" / "basic_auth.ini"
    monkeypatch.setenv("MLFLOW_AUTH_DATABASE_URI", uri)
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(path))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_USERNAME", "someone")
    monkeypatch.delenv("MLFLOW_AUTH_DEFAULT_PERMISSION", raising=False)
    assert script.main([str(path)]) == 0
    assert path.stat().st_mode & 0o777 == 0o600
    config = read_auth_config()
    assert config.database_uri == uri
    assert config.default_permission == "NO_PERMISSIONS"
    assert config.admin_username == "someone"  # from the environment (Secret mlflow-auth), not the file
    assert "admin_password" not in path.read_text()
    with pytest.raises(ValueError, match="MLFLOW_AUTH_DEFAULT_PERMISSION"):
        script.auth_config(uri, "EVERYTHING")
    monkeypatch.setenv("MLFLOW_AUTH_DATABASE_URI", "")
    assert script.main([str(tmp_path / "other.ini")]) == script.USAGE_ERROR
    assert not (tmp_path / "other.ini").exists()
    assert script.main([]) == script.USAGE_ERROR
