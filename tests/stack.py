"""The four sign-up services as real processes, each with its own fresh database.

Used by the end-to-end tests: a unique broker name prefix isolates each stack, a real SMTP
sink (aiosmtpd) receives the mail and a real OTLP receiver the spans.
"""

from __future__ import annotations

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

import httpx
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from tributary.testkit.otlp import OtlpReceiver
from tributary.testkit.processes import ServiceProcess, free_port, service_env

SIGNUP_SERVICES = ("identity", "onboarding", "email", "audit")


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
    ports: dict[str, int] = field(default_factory=dict)
    _token: tuple[str, float] | None = None

    def env_for(self, name: str, port: int) -> dict[str, str]:
        upper = name.upper()
        values = {
            "RABBITMQ_URL": self.broker_url,
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


def queue_names(prefix: str, tiers: int = 3) -> list[str]:
    names: list[str] = []
    for base in (*(f"{s}.events" for s in SIGNUP_SERVICES), "email.send"):
        root = base.removesuffix(".events")
        names += [f"{prefix}{base}", f"{prefix}{root}.dlq"]
        names += [f"{prefix}{root}.retry.{n}" for n in range(1, tiers + 1)]
    return names
