"""The four sign-up services as real processes, each with its own fresh database.

Used by the end-to-end tests: a unique broker name prefix isolates each stack, a real SMTP
sink (aiosmtpd) receives the mail and a real OTLP receiver the spans. As in production, each
service connects as its own broker user (provisioned from the catalog under the stack's
prefix) and checks the sender of every message.

Billing and the payment provider are opt-in (``BILLING_SERVICES``): the provider is the
external system's stand-in (no broker), billing calls it with the stack's API key, and it
signs its webhooks to billing with the stack's webhook secret, retrying within seconds.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
import uuid
from collections.abc import Generator
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

import aio_pika
import httpx
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from tributary.contracts.catalog import catalog
from tributary.eventctl.credentials import (
    Credentials,
    choose_backend,
    provision_users,
    remove_users,
)
from tributary.eventctl.provision import DefinitionsBackend
from tributary.messaging.testing import publish_raw
from tributary.messaging.topology import Names
from tributary.testkit.otlp import OtlpReceiver
from tributary.testkit.processes import ServiceProcess, free_port, module_of, service_env

SIGNUP_SERVICES = ("identity", "onboarding", "email", "audit")
ALL_SERVICES = (*SIGNUP_SERVICES, "notification")
PROVIDER = "payment-provider"
"""The payment provider: a process of the stack, but not on the bus (no broker user)."""
BILLING_SERVICES = ("identity", "email", "audit", "notification", "billing", PROVIDER)
"""A paid plan end to end: identity activates it, email mails the receipt, notification
tells the user, audit records it; billing and the provider take the payment. Opt-in: the
other stacks start neither billing nor the provider."""


class MailSink:
    """A real SMTP server on 127.0.0.1 keeping every message it accepts."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.messages: list[Message] = []
        self._controller: Controller | None = None

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content: Any = envelope.original_content or envelope.content or b""
        self.messages.append(message_from_bytes(content if isinstance(content, bytes) else b""))
        return "250 OK"

    def start(self) -> None:
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def to(self, address: str) -> list[Message]:
        return [m for m in self.messages if address in str(m.get("To", ""))]


@dataclass(frozen=True)
class Letter:
    """A dead letter: its headers (the reason among them), body and sender."""

    headers: dict[str, Any]
    body: bytes
    user_id: str | None


@dataclass
class Stack:
    broker_url: str
    workdir: Path
    database_urls: dict[str, str]
    prefix: str = field(default_factory=lambda: f"e{uuid.uuid4().hex[:10]}.")
    mail: MailSink = field(default_factory=MailSink)
    otlp: OtlpReceiver | None = None
    services: dict[str, ServiceProcess] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)
    admin_key: str = field(default_factory=lambda: f"trib_{secrets.token_urlsafe(32)}")
    """Registered by identity at start-up (``BOOTSTRAP_ADMIN_API_KEY``) for the built-in owner."""
    provider_key: str = field(default_factory=lambda: f"pp_test_{secrets.token_urlsafe(24)}")
    """Billing's API key at the payment provider (the one key the provider accepts)."""
    webhook_secret: str = field(
        default_factory=lambda: "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    )
    """The provider signs its webhooks with it; billing accepts it."""
    activation_timeout: float = 6.0
    """``BILLING_ACTIVATION_TIMEOUT_SECONDS``: how long billing waits for identity's activation of a
    paid plan before it compensates (refund); short, so a test can outwait it."""
    ports: dict[str, int] = field(default_factory=dict)
    provisioner: DefinitionsBackend | None = None
    """How the stack's broker users are made (default: management API or rabbitmqctl)."""
    credentials: Credentials | None = None
    """A broker user per service, foreign producer and operator, made by :meth:`start`."""
    _token: tuple[str, float] | None = None

    def _backend(self) -> DefinitionsBackend:
        if self.provisioner is None:
            self.provisioner = choose_backend(self.broker_url)
        return self.provisioner

    def provision_users(self) -> Credentials:
        """Every catalog user, named ``<prefix><role>``, with random passwords (idempotent)."""
        if self.credentials is None:
            self.credentials = asyncio.run(
                provision_users(
                    self.broker_url,
                    name_prefix=self.prefix,
                    user_prefix=self.prefix,
                    backend=self._backend(),
                )
            )
        return self.credentials

    def remove_users(self) -> None:
        if self.credentials is not None:
            asyncio.run(remove_users(self.credentials.plan, self._backend()))
            self.credentials = None

    def url_of(self, role: str) -> str:
        """The AMQP URL of a broker user of this stack (a service, foreign producer, eventctl)."""
        return self.provision_users().url(role)

    def producer_url(self, routing_key: str) -> str:
        """The URL of a user the catalog allows to publish ``routing_key``'s type."""
        name = catalog().by_routing_key(routing_key).type
        return self.url_of(catalog().type(name).producers[0])

    def publish(
        self,
        routing_key: str,
        body: bytes,
        *,
        url: str | None = None,
        headers: dict[str, Any] | None = None,
        message_id: str | None = None,
        times: int = 1,
    ) -> None:
        """Publish ``body`` to the stack's events exchange as a producer of its type (or as the
        user of ``url``), naming that user in ``user_id``."""
        sender = url or self.producer_url(routing_key)

        async def go() -> None:
            for _ in range(times):
                await publish_raw(
                    sender,
                    Names(self.prefix),
                    routing_key,
                    body,
                    headers=headers,
                    message_id=message_id,
                )

        asyncio.run(go())

    def take_dead_letters(self, queue_set: str) -> list[Letter]:
        """Everything in ``<prefix><queue_set>.dlq`` now (read and removed)."""

        async def go() -> list[Letter]:
            letters: list[Letter] = []
            connection = await aio_pika.connect(self.broker_url)
            async with connection:
                channel = await connection.channel()
                queue = await channel.declare_queue(f"{self.prefix}{queue_set}.dlq", passive=True)
                while (message := await queue.get(fail=False, no_ack=True)) is not None:
                    letters.append(Letter(dict(message.headers), message.body, message.user_id))
            return letters

        return asyncio.run(go())

    def _provider_env(self, port: int) -> dict[str, str]:
        values = {
            "PAYMENT_PROVIDER_DATABASE_URL": self.database_urls[PROVIDER],
            "PAYMENT_PROVIDER_PORT": str(port),
            "PAYMENT_PROVIDER_PUBLIC_URL": f"http://127.0.0.1:{port}",
            "PAYMENT_PROVIDER_API_KEYS": json.dumps([self.provider_key]),
            "PAYMENT_PROVIDER_WEBHOOK_SECRET": self.webhook_secret,
            # a refused or lost webhook comes again within seconds, not minutes
            "PAYMENT_PROVIDER_WEBHOOK_RETRY_SECONDS": "[0.2, 0.5, 1, 2, 4]",
            "PAYMENT_PROVIDER_WEBHOOK_TIMEOUT_SECONDS": "5",
            "PAYMENT_PROVIDER_POLL_SECONDS": "0.2",
            "LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
        }
        if "billing" in self.ports:
            webhooks = f"http://127.0.0.1:{self.ports['billing']}/webhooks/payments"
            values["PAYMENT_PROVIDER_WEBHOOK_URL"] = webhooks
        values.update(self.extra_env)
        env = service_env(values)
        env.pop("RABBITMQ_URL", None)  # an external system: no broker
        return env

    def env_for(self, name: str, port: int) -> dict[str, str]:
        if name == PROVIDER:
            return self._provider_env(port)
        upper = module_of(name).upper()
        values = {
            # each service connects as its own user, and checks every sender
            "RABBITMQ_URL": self.url_of(name),
            "TRIBUTARY_BROKER_USER_PREFIX": self.prefix,
            "TRIBUTARY_VERIFY_SENDER": "true",
            "TRIBUTARY_NAME_PREFIX": self.prefix,
            "TRIBUTARY_RETRY_TIERS": "[0.5, 1.0, 2.0]",
            "TRIBUTARY_INPROCESS_BACKOFF_SECONDS": "0.05",
            "TRIBUTARY_OUTBOX_POLL_SECONDS": "0.5",
            f"{upper}_DATABASE_URL": self.database_urls[name],
            f"{upper}_PORT": str(port),
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(self.mail.port),
            "LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
            "BOOTSTRAP_ADMIN_API_KEY": self.admin_key,
            # one machine signs hundreds of users up from one address: limits out of the way
            "TRIBUTARY_RATE_SIGNUP": "100000/minute",
            "TRIBUTARY_RATE_TOKEN": "100000/minute",
            "TRIBUTARY_RATE_WRITES": "100000/minute",
        }
        if "identity" in self.ports:  # every service verifies tokens with identity's keys
            values["TRIBUTARY_AUTH_ISSUER"] = f"http://127.0.0.1:{self.ports['identity']}"
        if name == "notification":
            values.update(
                NOTIFICATION_PUBLIC_URL=f"http://127.0.0.1:{port}",
                NOTIFICATION_UNSUBSCRIBE_KEY=secrets.token_urlsafe(32),
                NOTIFICATION_SSE_HEARTBEAT_SECONDS="1",
                # webhook receivers and retry schedules of a test, digest windows in seconds
                NOTIFICATION_WEBHOOK_ALLOW_LOOPBACK="true",
                NOTIFICATION_WEBHOOK_RETRY_SCHEDULE="[0, 1, 2, 4]",
                NOTIFICATION_DIGEST_WINDOW_SECONDS="30",  # outlasts a restart on a busy machine
            )
        if name == "billing":
            values.update(
                BILLING_PROVIDER_API_KEY=self.provider_key,
                BILLING_WEBHOOK_SECRETS=json.dumps([self.webhook_secret]),
                BILLING_ACTIVATION_TIMEOUT_SECONDS=str(self.activation_timeout),
            )
            if PROVIDER in self.ports:
                values["BILLING_PROVIDER_URL"] = f"http://127.0.0.1:{self.ports[PROVIDER]}"
        if self.otlp is not None:
            values.update(
                OTEL_EXPORTER_OTLP_ENDPOINT=self.otlp.endpoint,
                OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
                OTEL_BSP_SCHEDULE_DELAY="100",
                OTEL_TRACES_SAMPLER="parentbased_always_on",
            )
        else:
            values["OTEL_SDK_DISABLED"] = "true"
        values.update(self.extra_env)
        return service_env(values)

    def start(self, names: tuple[str, ...] = SIGNUP_SERVICES) -> None:
        for name in names:
            self.ports.setdefault(name, free_port())
        for name in names:
            port = self.ports[name]
            process = ServiceProcess(
                name, port, self.env_for(name, port), self.workdir / f"{name}.log"
            )
            self.services[name] = process
            process.start()
        for name in names:
            self.services[name].wait_ready()

    def restart(self, name: str) -> None:
        process = self.services[name]
        process.start()
        process.wait_ready()

    def stop(self) -> None:
        for process in self.services.values():
            process.stop()

    def url(self, name: str) -> str:
        return self.services[name].url

    def admin_token(self) -> str:
        """A bearer token of the built-in owner (every scope), renewed a minute before expiry."""
        if self._token is None or self._token[1] < time.monotonic() + 60:
            form = {"grant_type": "client_credentials", "client_secret": self.admin_key}
            with httpx.Client(base_url=self.url("identity"), timeout=10) as client:
                answer = client.post("/oauth/token", data=form)
            answer.raise_for_status()
            body = answer.json()
            self._token = (body["access_token"], time.monotonic() + body["expires_in"])
        return self._token[0]

    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token()}"}

    def auth(self) -> httpx.Auth:
        """For long-lived clients (sync or async): a current owner's token on every request."""
        return _AdminAuth(self)

    def client(self, name: str, *, admin: bool = True) -> httpx.Client:
        """A client of one service, sending the owner's token unless ``admin=False``."""
        auth = self.auth() if admin and "identity" in self.services else None
        return httpx.Client(base_url=self.url(name), timeout=10, auth=auth)

    def provider_client(self) -> httpx.Client:
        """A client of the payment provider's merchant API, with billing's API key."""
        headers = {"Authorization": f"Bearer {self.provider_key}"}
        return httpx.Client(base_url=self.url(PROVIDER), timeout=10, headers=headers)

    def logs(self) -> str:
        return "\n".join(p.log_text() for p in self.services.values())


class _AdminAuth(httpx.Auth):
    def __init__(self, stack: Stack) -> None:
        self.stack = stack

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self.stack.admin_token()}"
        yield request


def get_json(stack: Stack, service: str, path: str, **params: Any) -> Any:
    with stack.client(service) as client:
        response = client.get(path, params=params)
        response.raise_for_status()
        return response.json()


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def queue_names(
    prefix: str, tiers: int = 3, services: tuple[str, ...] = SIGNUP_SERVICES
) -> list[str]:
    """Every queue the services declare: their event queue sets and their command queues (the
    payment provider declares none)."""
    on_the_bus = [s for s in services if s != PROVIDER]
    commands = [
        spec.name
        for spec in catalog()
        if spec.kind == "command" and set(spec.consumers) & set(on_the_bus)
    ]
    names: list[str] = []
    for base in (*(f"{s}.events" for s in on_the_bus), *commands):
        root = base.removesuffix(".events")
        names += [f"{prefix}{base}", f"{prefix}{root}.dlq"]
        names += [f"{prefix}{root}.retry.{n}" for n in range(1, tiers + 1)]
    return names
