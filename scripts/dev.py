"""``make dev``: every service as a local process against ``RABBITMQ_URL``.

Starts a development SMTP sink when ``SMTP_HOST`` is unset, prefixes each process's output
with its name, waits until every ``/health/ready`` answers, and stops everything on Ctrl-C or
SIGTERM. The environment is forwarded to every process.

Broker: ``RABBITMQ_URL`` is an administrator's connection. The catalog's broker users (one
per service, per foreign producer, and ``eventctl``) are provisioned into its vhost (names
prefixed ``<vhost>.`` unless the vhost is ``/``; passwords derived from
``TRIBUTARY_BROKER_SECRET``), each service connects as its own user with the sender check on,
and ``var/eventctl.env`` holds the operator's connection for ``eventctl``.

Secrets: identity registers ``BOOTSTRAP_ADMIN_API_KEY`` as an owner's API key, and the email
service keys its address hashes with ``EMAIL_ADDRESS_KEY``. Unset, each is generated once into
``var/`` (mode 0600) and reused; how to get a bearer token is printed when all are ready.

Billing and the payment provider: billing calls the provider at 127.0.0.1:8007 with
``BILLING_PROVIDER_API_KEY`` (the provider's one accepted key), and the provider signs its
webhooks to billing's ``/webhooks/payments`` with ``PAYMENT_PROVIDER_WEBHOOK_SECRET`` (the one
billing accepts); both are secrets as above. The provider stands in for an external system: no
broker user, and the administrator's ``RABBITMQ_URL`` is not passed to it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
import local_secrets  # scripts/local_secrets.py, beside this file

# name, port: the fixed local ports of the README. The name is the workspace member under
# services/ (and the compose service); its module and settings prefix are module_of(name).
SERVICES: list[tuple[str, int]] = [
    ("identity", 8001),
    ("onboarding", 8002),
    ("email", 8003),
    ("audit", 8004),
    ("notification", 8005),
    ("billing", 8006),
    ("payment-provider", 8007),
]
PROVIDER = "payment-provider"
"""Not a Tributary service on the bus: an external system's stand-in (no broker user)."""
COLORS = ["\033[36m", "\033[32m", "\033[35m", "\033[33m", "\033[34m", "\033[31m", "\033[37m"]
RESET = "\033[0m"


EVENTCTL_ENV = Path("var/eventctl.env")

HOW_TO_CALL = """dev        | admin API key: {where} (the built-in admin user, role owner)
dev        | a token:  TOKEN=$(make -s token)   (scripts/access_token.py: client-credentials grant)
dev        | then:     curl -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8004/audit
dev        | eventctl: set -a; . var/eventctl.env; set +a   (connects as the operator user)
dev        | provider: API key {provider_key} (billing's; pay at a subscription's pay_url)"""


def module_of(name: str) -> str:
    """``payment-provider`` -> ``payment_provider``: ``tributary.<module>``, ``<MODULE>_*``."""
    return name.replace("-", "_")


def _billing_env(env: dict[str, str]) -> None:
    """Billing and the provider agree on the provider's API key and the webhook secret, and
    each knows where the other listens (the fixed ports). Values in the environment win."""
    ports = dict(SERVICES)
    key = env["BILLING_PROVIDER_API_KEY"]
    secret = env["PAYMENT_PROVIDER_WEBHOOK_SECRET"]
    provider = f"http://127.0.0.1:{ports[PROVIDER]}"
    env.setdefault("BILLING_PROVIDER_URL", provider)
    env.setdefault("BILLING_WEBHOOK_SECRETS", json.dumps([secret]))
    env.setdefault("PAYMENT_PROVIDER_API_KEYS", json.dumps([key]))
    env.setdefault("PAYMENT_PROVIDER_PUBLIC_URL", provider)
    env.setdefault(
        "PAYMENT_PROVIDER_WEBHOOK_URL", f"http://127.0.0.1:{ports['billing']}/webhooks/payments"
    )


@dataclass
class Child:
    name: str
    process: asyncio.subprocess.Process
    pump: asyncio.Task[None]


async def _pump(name: str, color: str, stream: asyncio.StreamReader) -> None:
    prefix = f"{color}{name:<11}|{RESET} " if sys.stdout.isatty() else f"{name:<11}| "
    while line := await stream.readline():
        sys.stdout.write(prefix + line.decode(errors="replace"))
        sys.stdout.flush()


async def _spawn(name: str, color: str, *argv: str, env: dict[str, str]) -> Child:
    process = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    if process.stdout is None:  # not possible with stdout=PIPE; keeps the type checker sure
        raise RuntimeError(f"{name}: no output pipe")
    return Child(name, process, asyncio.create_task(_pump(name, color, process.stdout)))


async def _broker_users(env: dict[str, str]) -> dict[str, str]:
    """Provision the catalog's broker users into RABBITMQ_URL's vhost; each one's URL."""
    from tributary.eventctl.credentials import derived_password, provision_users

    made = await provision_users(
        env["RABBITMQ_URL"],
        name_prefix=env.get("TRIBUTARY_NAME_PREFIX", ""),
        password=derived_password(local_secrets.for_dev(local_secrets.BROKER_SECRET)),
    )
    print(
        f"dev        | broker users in vhost {made.plan.vhost}: {len(made.plan.users)} "
        f"(prefix {made.user_prefix or 'none'}), {len(made.changes)} change(s)",
        flush=True,
    )
    env["TRIBUTARY_BROKER_USER_PREFIX"] = made.user_prefix
    env.setdefault("TRIBUTARY_VERIFY_SENDER", "true")
    local_secrets.private_write(
        EVENTCTL_ENV,
        f"RABBITMQ_URL={made.url('eventctl')}\n"
        f"TRIBUTARY_BROKER_USER_PREFIX={made.user_prefix}\n"
        f"TRIBUTARY_NAME_PREFIX={env.get('TRIBUTARY_NAME_PREFIX', '')}\n",
    )
    return dict(made.urls)


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _postgres(env: dict[str, str]) -> None:
    """PostgreSQL mode: the databases and the audit roles made as compose makes them (the same
    script, deploy/postgres/init-databases.sh), and every service pointed at its database."""
    server = urlsplit(env.get("DEV_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432"))
    host, port = server.hostname or "127.0.0.1", server.port or 5432
    user = server.username or "postgres"
    script_env = {**env, "PGHOST": host, "PGPORT": str(port), "POSTGRES_USER": user}
    if server.password:
        script_env["PGPASSWORD"] = server.password
    bash = shutil.which("bash") or "/bin/bash"
    script = [bash, "deploy/postgres/init-databases.sh"]
    subprocess.run(script, env=script_env, check=True)  # noqa: S603 (our own script)
    base = f"postgresql+asyncpg://{{}}@{host}:{port}/"
    login = f"{user}:{server.password}" if server.password else user
    for name, _port in SERVICES:
        if name != "audit":
            module = module_of(name)  # the database is named like the module: payment_provider
            env.setdefault(f"{module.upper()}_DATABASE_URL", base.format(login) + module)
    # audit appends as audit_app; its migrations run as audit_owner (see the script)
    env["AUDIT_DATABASE_URL"] = base.format("audit_app:audit_app") + "audit"
    env["AUDIT_MIGRATION_DATABASE_URL"] = base.format("audit_owner:audit_owner") + "audit"
    env["AUDIT_APP_ROLE"] = "audit_app"


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="every service as a local process")
    parser.add_argument(
        "--database",
        choices=("sqlite", "postgres"),
        default="sqlite",
        help="SQLite files in var/ (default), or PostgreSQL at $DEV_POSTGRES_URL "
        "(default postgresql://postgres@127.0.0.1:5432): databases identity, onboarding, ..., "
        "billing, payment_provider",
    )
    args = parser.parse_args(argv)
    env = dict(os.environ)
    if args.database == "postgres":
        try:
            _postgres(env)
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"dev        | cannot prepare PostgreSQL: {exc}", flush=True)
            return 1
    env.setdefault("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
    env.setdefault("PYTHONUNBUFFERED", "1")
    os.makedirs("var", exist_ok=True)
    from_env = local_secrets.ADMIN_KEY in env
    for name in local_secrets.SECRETS:
        env[name] = local_secrets.for_dev(name)
    _billing_env(env)
    from tributary.eventctl.admin import AdminError

    try:
        broker_urls = await _broker_users(env)
    except (AdminError, OSError) as exc:
        print(f"dev        | cannot provision the broker users: {exc}", flush=True)
        return 1
    children: list[Child] = []
    if not env.get("SMTP_HOST"):
        env["SMTP_HOST"], env["SMTP_PORT"] = "127.0.0.1", env.get("SMTP_PORT", "1025")
        children.append(
            await _spawn(
                "mailsink",
                COLORS[-1],
                sys.executable,
                "scripts/mailsink.py",
                "--port",
                env["SMTP_PORT"],
                "--dir",
                "var/mail",
                env=env,
            )
        )
    for i, (name, _port) in enumerate(SERVICES):
        own = dict(env)
        if name == PROVIDER:
            del own["RABBITMQ_URL"]  # no broker at all, and never the administrator's
        else:
            own["RABBITMQ_URL"] = broker_urls[name]  # its own broker user, not the admin
        module = f"tributary.{module_of(name)}"
        children.append(
            await _spawn(name, COLORS[i % len(COLORS)], sys.executable, "-m", module, env=own)
        )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    deadline = time.monotonic() + 90
    pending = dict(SERVICES)
    while pending and not stop.is_set():
        for name, port in list(pending.items()):
            if await asyncio.to_thread(_ready, port):
                print(
                    f"dev        | {name} ready on http://127.0.0.1:{port} (docs: /docs)",
                    flush=True,
                )
                del pending[name]
        if any(c.process.returncode is not None for c in children):
            print("dev        | a process exited during start-up; stopping", flush=True)
            stop.set()
        elif time.monotonic() > deadline:
            print(f"dev        | not ready after 90 s: {', '.join(pending)}; stopping", flush=True)
            stop.set()
        else:
            await asyncio.sleep(0.5)
    if not stop.is_set():
        where = (
            "$BOOTSTRAP_ADMIN_API_KEY"
            if from_env
            else str(local_secrets.dev_file(local_secrets.ADMIN_KEY))
        )
        provider_key = (
            "$BILLING_PROVIDER_API_KEY"
            if "BILLING_PROVIDER_API_KEY" in os.environ
            else str(local_secrets.dev_file("BILLING_PROVIDER_API_KEY"))
        )
        print(HOW_TO_CALL.format(where=where, provider_key=provider_key), flush=True)
        print("dev        | all services ready; Ctrl-C stops them", flush=True)
        waiters = [asyncio.create_task(c.process.wait()) for c in children]
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([stopper, *waiters], return_when=asyncio.FIRST_COMPLETED)
    code = 0 if all(c.process.returncode in (None, 0) for c in children) else 1
    for child in children:
        if child.process.returncode is None:
            child.process.terminate()
    for child in children:
        try:
            await asyncio.wait_for(child.process.wait(), 15)
        except TimeoutError:
            child.process.kill()
        await child.pump
    return code


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
