"""deploy/k8s: every overlay renders with kustomize, every object is valid against its schema,
and the manifests keep the promises the README makes about them.

Rendering is kustomize's own (``kubectl kustomize``). Core objects are validated against the
Kubernetes API's OpenAPI schemas (kubernetes-validate, offline, strict: no unknown field);
custom resources against their operators' published CRD schemas (tests/k8s_crds), also
refusing fields the schema does not know (the API server would silently drop them). Nothing
here talks to a cluster.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from tributary.contracts.catalog import catalog
from tributary.eventctl.access import demo_password, plan_access
from tributary.eventctl.k8s import credentials_secret

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
CRDS = Path(__file__).parent / "k8s_crds"
OVERLAYS = ("dev", "prod")
KUBERNETES_VERSION = "1.33.0"
NAMESPACE = "tributary"
SERVICES = {
    "identity": 8001,
    "onboarding": 8002,
    "email": 8003,
    "audit": 8004,
    "notification": 8005,
    "billing": 8006,
}
DEV_ONLY = {"payment-provider": 8007}
SECRETISH = re.compile(r"PASSWORD|SECRET|_KEY$|KEYS$|TOKEN", re.IGNORECASE)

Doc = dict[str, Any]


def kustomize(path: Path) -> list[Doc]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl (with its built-in kustomize) is needed to render deploy/k8s")
        pytest.skip("kubectl is not installed: deploy/k8s not rendered")
    proc = subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.load_all(proc.stdout, Loader=yaml.CSafeLoader) if d]


@functools.cache
def _rendered(name: str) -> tuple[Doc, ...]:
    path = K8S / "base" if name == "base" else K8S / "overlays" / name
    return tuple(kustomize(path))


def rendered(name: str) -> list[Doc]:
    return list(_rendered(name))


def of_kind(docs: list[Doc], kind: str) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def containers(pod_spec: Doc) -> Iterator[Doc]:
    yield from pod_spec.get("initContainers", [])
    yield from pod_spec["containers"]


def pod_specs(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            yield doc, doc["spec"]["template"]["spec"]


def env_of(container: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in container.get("env", [])}


# -- custom resources against their CRDs ------------------------------------------------------


@functools.cache
def crd_schemas() -> dict[tuple[str, str], Doc]:
    """(apiVersion, kind) -> the served version's openAPIV3Schema."""
    found = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=yaml.CSafeLoader)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                found[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return found


def unknown_fields(value: Any, schema: Doc, path: str = "") -> list[str]:
    """Fields the structural schema does not declare (the API server would prune them)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found: list[str] = []
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if props is not None and key in props:
                found += unknown_fields(item, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += unknown_fields(item, extra, f"{path}.{key}")
            elif props is not None and extra is None and path != ".metadata":
                found.append(f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


def validate(doc: Doc) -> None:
    key = (doc["apiVersion"], doc["kind"])
    schema = crd_schemas().get(key)
    if schema is None:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        return
    jsonschema.Draft7Validator(schema).validate(doc)
    assert unknown_fields(doc, schema) == [], key


# -- rendering and schemas --------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_valid_against_its_schema(overlay: str) -> None:
    docs = rendered(overlay)
    kinds = {d["kind"] for d in docs}
    # the custom resources this deployment is made of, each with a vendored CRD
    assert {
        "RabbitmqCluster",
        "User",
        "Permission",
        "TopicPermission",
        "Cluster",
        "Database",
        "ScaledObject",
        "TriggerAuthentication",
    } <= kinds
    for doc in docs:
        try:
            validate(doc)
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as exc:
            pytest.fail(f"{overlay}: {doc['kind']}/{doc['metadata']['name']}: {exc.message}")
        assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == NAMESPACE


def test_the_schema_checks_catch_mistakes() -> None:
    """The validator used above refuses what the API server would refuse or silently drop."""
    cluster = of_kind(rendered("dev"), "RabbitmqCluster")["tributary-rabbitmq"]
    wrong_type = {**cluster, "spec": {**cluster["spec"], "replicas": "three"}}
    with pytest.raises(jsonschema.ValidationError):
        validate(wrong_type)
    typo = {**cluster, "spec": {**cluster["spec"], "replica": 3}}
    with pytest.raises(AssertionError):
        validate(typo)
    deployment = of_kind(rendered("dev"), "Deployment")["identity"]
    with pytest.raises(kubernetes_validate.ValidationError):
        validate({**deployment, "spec": {**deployment["spec"], "replicaz": 2}})
    assert unknown_fields({"a": {"b": 1, "c": 2}}, {"properties": {"a": {"properties": {}}}}) == [
        ".a.b",
        ".a.c",
    ]


# -- the services -----------------------------------------------------------------------------


def service_settings_port(service: str) -> int:
    module = importlib.import_module(f"tributary.{service.replace('-', '_')}.settings")
    port: int = module.Settings.model_fields["port"].default
    return port


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_service_runs_as_its_settings_say(overlay: str) -> None:
    docs = rendered(overlay)
    deployments, services = of_kind(docs, "Deployment"), of_kind(docs, "Service")
    expected = SERVICES | (DEV_ONLY if overlay == "dev" else {})
    for name, port in expected.items():
        assert service_settings_port(name) == port
        (container,) = deployments[name]["spec"]["template"]["spec"]["containers"]
        assert container["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
        env = env_of(container)
        assert env[f"{name.replace('-', '_').upper()}_PORT"]["value"] == str(port)
        assert services[name]["spec"]["ports"][0]["port"] == port
        assert services[name]["spec"]["selector"] == {"app.kubernetes.io/name": name}
        probes = {
            kind: container[kind]["httpGet"]
            for kind in ("livenessProbe", "readinessProbe", "startupProbe")
        }
        assert probes["livenessProbe"] == {"path": "/health/live", "port": "http"}
        assert probes["readinessProbe"] == {"path": "/health/ready", "port": "http"}
    if overlay == "prod":
        assert not set(DEV_ONLY) & set(deployments)


def test_the_probed_routes_exist() -> None:
    source = (ROOT / "libs/service/src/tributary/service/app.py").read_text()
    assert '@router.get("/health/live")' in source
    assert '@router.get("/health/ready"' in source


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_probed_bounded_unprivileged_and_pinned(overlay: str) -> None:
    for owner, spec in pod_specs(rendered(overlay)):
        where = f"{owner['kind']}/{owner['metadata']['name']}"
        pod_security = spec["securityContext"]
        assert pod_security["runAsNonRoot"] is True, where
        assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["automountServiceAccountToken"] is False, where
        for container in containers(spec):
            resources = container["resources"]
            assert set(resources["requests"]) == {"cpu", "memory"}, where
            assert set(resources["limits"]) == {"cpu", "memory"}, where
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["capabilities"] == {"drop": ["ALL"]}, where
            assert_pinned(container["image"])
            if owner["kind"] == "Deployment" and container in spec["containers"]:
                assert "livenessProbe" in container, where
                assert "readinessProbe" in container, where


def assert_pinned(image: str) -> None:
    name, _, tag = image.rpartition(":")
    assert "@sha256:" in image or (name and "/" not in tag and tag not in ("", "latest")), image


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_operator_images_are_pinned_too(overlay: str) -> None:
    docs = rendered(overlay)
    for cluster in of_kind(docs, "RabbitmqCluster").values():
        assert_pinned(cluster["spec"]["image"])
    for cluster in of_kind(docs, "Cluster").values():
        assert_pinned(cluster["spec"]["imageName"])


def matches(selector: Doc, labels: Doc) -> bool:
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_deployment_has_a_disruption_budget(overlay: str) -> None:
    docs = rendered(overlay)
    budgets = of_kind(docs, "PodDisruptionBudget").values()
    for name, deployment in of_kind(docs, "Deployment").items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert matches(deployment["spec"]["selector"], labels)
        covering = [b for b in budgets if matches(b["spec"]["selector"], labels)]
        assert len(covering) == 1, name
        # one replica may go at a time, whatever the replica count
        assert covering[0]["spec"] == {
            "maxUnavailable": 1,
            "selector": covering[0]["spec"]["selector"],
        }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_migrations_run_once_per_release_before_the_service_serves(overlay: str) -> None:
    docs = rendered(overlay)
    jobs, deployments = of_kind(docs, "Job"), of_kind(docs, "Deployment")
    expected = set(SERVICES) | (set(DEV_ONLY) if overlay == "dev" else set())
    assert {n.removesuffix("-migrate") for n in jobs} == expected
    for service in expected:
        job = jobs[f"{service}-migrate"]["spec"]
        (migrate,) = job["template"]["spec"]["containers"]
        pod = deployments[service]["spec"]["template"]["spec"]
        (wait,) = pod["initContainers"]
        (app,) = pod["containers"]
        assert migrate["command"] == ["python", "-m", "tributary.service.migrate", service]
        assert wait["command"][:5] == [
            "python",
            "-m",
            "tributary.service.migrate",
            service,
            "--wait",
        ]
        # the same image (release) and the same database as the service itself
        assert migrate["image"] == wait["image"] == app["image"]
        app_env = env_of(app)
        for env in (env_of(migrate), env_of(wait)):
            for name, value in env.items():
                assert app_env[name] == value
        assert job["template"]["spec"]["restartPolicy"] == "OnFailure"
        assert job["ttlSecondsAfterFinished"] > 0


# -- secrets ----------------------------------------------------------------------------------


def referenced_secrets(docs: list[Doc]) -> dict[str, bool]:
    """Every Secret a pod or a custom resource names, with whether it may be missing."""
    found: dict[str, bool] = {}
    for _, spec in pod_specs(docs):
        for container in containers(spec):
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    found[ref["name"]] = found.get(ref["name"], True) and ref.get("optional", False)
    for user in of_kind(docs, "User").values():
        found[user["spec"]["importCredentialsSecret"]["name"]] = False
    for cluster in of_kind(docs, "Cluster").values():
        for role in cluster["spec"]["managed"]["roles"]:
            found[role["passwordSecret"]["name"]] = False
    for auth in of_kind(docs, "TriggerAuthentication").values():
        for ref in auth["spec"]["secretTargetRef"]:
            found[ref["name"]] = False
    return found


def test_no_secret_value_in_the_base() -> None:
    docs = rendered("base")
    assert of_kind(docs, "Secret") == {}
    for owner, spec in pod_specs(docs):
        for container in containers(spec):
            for env in container.get("env", []):
                if SECRETISH.search(env["name"]):
                    assert "value" not in env, (owner["metadata"]["name"], env["name"])
                # a URL carries credentials only as references to Secret-backed variables
                for userinfo in re.findall(r"://([^/@]*)@", env.get("value", "")):
                    assert re.fullmatch(r"\$\([A-Z_]+\):\$\([A-Z_]+\)", userinfo), env
    # and no demo password anywhere in the base's files
    text = "\n".join(p.read_text() for p in (K8S / "base").rglob("*.yaml"))
    for user in plan_access(catalog()).users:
        assert demo_password(user.name) not in text


def test_prod_generates_no_secret_and_documents_every_one_it_needs() -> None:
    docs = rendered("prod")
    assert of_kind(docs, "Secret") == {}
    documented = (K8S / "overlays" / "prod" / "secrets.md").read_text()
    for name in referenced_secrets(docs):
        listed = f"`{name}`" in documented
        if name.startswith("broker-"):
            listed = listed or f"`{name.removeprefix('broker-')}`" in documented
        assert listed, name


def test_dev_generates_every_secret_it_needs_with_dev_values() -> None:
    docs = rendered("dev")
    secrets = of_kind(docs, "Secret")
    for name, optional in referenced_secrets(docs).items():
        assert name in secrets or optional, name
    # the broker users log in with the demo passwords of deploy/rabbitmq/definitions.json
    import base64

    def value(secret: Doc, key: str) -> str:
        return base64.b64decode(secret["data"][key]).decode()

    users = of_kind(docs, "User")
    for user in plan_access(catalog()).users:
        (secret_name,) = [
            u["spec"]["importCredentialsSecret"]["name"]
            for n, u in users.items()
            if n == credentials_secret(user)
        ]
        assert value(secrets[secret_name], "username") == user.name
        assert value(secrets[secret_name], "password") == demo_password(user.name)
    for secret in secrets.values():
        if secret.get("type") == "kubernetes.io/basic-auth":
            password = value(secret, "password")
            assert password.startswith("dev-"), password


# -- broker, database, autoscaling, traces ----------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_reach_the_broker_and_database_the_overlay_runs(overlay: str) -> None:
    docs = rendered(overlay)
    (broker,) = of_kind(docs, "RabbitmqCluster")
    (database,) = of_kind(docs, "Cluster")
    cluster = of_kind(docs, "Cluster")[database]
    roles = {r["name"] for r in cluster["spec"]["managed"]["roles"]}
    databases = {d["spec"]["name"]: d["spec"] for d in of_kind(docs, "Database").values()}
    deployments = of_kind(docs, "Deployment")
    expected = set(SERVICES) | (set(DEV_ONLY) if overlay == "dev" else set())
    for service in expected:
        env = env_of(deployments[service]["spec"]["template"]["spec"]["containers"][0])
        for name, entry in env.items():
            url = entry.get("value", "")
            if name.endswith("DATABASE_URL"):
                found = re.fullmatch(r"postgresql\+asyncpg://[^@]+@([^:/]+):5432/(\w+)", url)
                assert found is not None, url
                host, db = found.groups()
                assert host == f"{database}-rw"
                assert db in databases
                assert databases[db]["cluster"]["name"] == database
                assert databases[db]["owner"] in roles
        if service in SERVICES:
            url = env["RABBITMQ_URL"]["value"]
            assert re.fullmatch(rf"amqp://[^@]+@{broker}:5672/", url), url
            secret = env["RABBITMQ_USERNAME"]["valueFrom"]["secretKeyRef"]["name"]
            assert secret.startswith(f"broker-{service}")
    for resource in [*of_kind(docs, "User").values(), *of_kind(docs, "Permission").values()]:
        assert resource["spec"]["rabbitmqClusterReference"] == {"name": broker}


def test_dev_and_prod_run_different_replica_counts() -> None:
    def counts(overlay: str) -> dict[str, int]:
        docs = rendered(overlay)
        found = {
            f"Deployment/{n}": d["spec"]["replicas"]
            for n, d in of_kind(docs, "Deployment").items()
            if n in SERVICES
        }
        found |= {
            f"ScaledObject/{n}": d["spec"]["minReplicaCount"]
            for n, d in of_kind(docs, "ScaledObject").items()
        }
        found["RabbitmqCluster"] = next(iter(of_kind(docs, "RabbitmqCluster").values()))["spec"][
            "replicas"
        ]
        found["Cluster"] = next(iter(of_kind(docs, "Cluster").values()))["spec"]["instances"]
        return found

    dev, prod = counts("dev"), counts("prod")
    assert dev.keys() == prod.keys()
    assert dev["RabbitmqCluster"] == 1
    assert prod["RabbitmqCluster"] == 3
    assert dev["Cluster"] == 1
    assert prod["Cluster"] == 3
    for key in dev:
        assert prod[key] > dev[key], key


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_consumers_scale_on_their_queues_with_their_own_broker_user(overlay: str) -> None:
    docs = rendered(overlay)
    deployments = of_kind(docs, "Deployment")
    auths = of_kind(docs, "TriggerAuthentication")
    (broker,) = of_kind(docs, "RabbitmqCluster")
    for name, scaled in of_kind(docs, "ScaledObject").items():
        spec = scaled["spec"]
        assert spec["scaleTargetRef"]["name"] in deployments
        deployment = deployments[spec["scaleTargetRef"]["name"]]
        assert spec["minReplicaCount"] == deployment["spec"]["replicas"]
        assert spec["maxReplicaCount"] > spec["minReplicaCount"]
        for trigger in spec["triggers"]:
            # the KEDA operator runs in its own namespace: the broker's full name
            assert trigger["metadata"]["host"] == f"amqp://{broker}.{NAMESPACE}.svc:5672/"
            auth = auths[trigger["authenticationRef"]["name"]]
            for ref in auth["spec"]["secretTargetRef"]:
                assert ref["name"].startswith(f"broker-{name}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_send_traces_to_the_collector_and_it_to_jaeger(overlay: str) -> None:
    docs = rendered(overlay)
    config_maps, services = of_kind(docs, "ConfigMap"), of_kind(docs, "Service")
    common = next(c for n, c in config_maps.items() if n.startswith("tributary-common"))
    endpoint = common["data"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
    found = re.fullmatch(r"http://([\w-]+):(\d+)", endpoint)
    assert found is not None, endpoint
    host, port = found.groups()
    assert int(port) in {p["port"] for p in services[host]["spec"]["ports"]}
    for name in SERVICES:
        container = of_kind(docs, "Deployment")[name]["spec"]["template"]["spec"]["containers"][0]
        assert {"configMapRef": {"name": common["metadata"]["name"]}} in container["envFrom"]
        assert env_of(container)["OTEL_SERVICE_NAME"]["value"] == name
    collector = yaml.safe_load(config_maps["otel-collector"]["data"]["config.yaml"])
    target = collector["exporters"]["otlp"]["endpoint"]
    jaeger, jaeger_port = target.split(":")
    assert int(jaeger_port) in {p["port"] for p in services[jaeger]["spec"]["ports"]}
