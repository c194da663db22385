"""A real webhook receiver for the tests: uvicorn on 127.0.0.1 (plain HTTP, or HTTPS with a
certificate of a test CA) that verifies every request with ``standardwebhooks`` and answers as
the test scripts it."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tributary.testkit.processes import free_port
from tributary.testkit.waiting import eventually


@dataclass(frozen=True)
class Answer:
    status: int = 200
    delay: float = 0.0
    """Seconds to wait before answering (a slow endpoint)."""


@dataclass
class Received:
    at: float
    """``time.monotonic()`` when it arrived."""
    path: str
    headers: dict[str, str]
    body: bytes
    verified_with: list[str]
    """The secrets (of ``Receiver.secrets``) whose signature it carries."""
    answered: int

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def signatures(self) -> list[str]:
        return self.headers["webhook-signature"].split(" ")


@dataclass
class Receiver:
    url: str
    secrets: list[str] = field(default_factory=list)
    """Each request is checked against each of these (set them after registering)."""
    script: deque[Answer] = field(default_factory=deque)
    """Answers for the next requests, in order; 200 once it is empty."""
    received: list[Received] = field(default_factory=list)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def answer(self, *statuses: int | Answer) -> None:
        for status in statuses:
            self.script.append(status if isinstance(status, Answer) else Answer(status))

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        verified = []
        for secret in self.secrets:
            try:
                Webhook(secret).verify(body, headers)
            except WebhookVerificationError:
                continue
            verified.append(secret)
        answer = self.script.popleft() if self.script else Answer()
        self.received.append(
            Received(time.monotonic(), scope["path"], headers, body, verified, answer.status)
        )
        self._arrived.set()
        if answer.delay:
            await asyncio.sleep(answer.delay)
        await send({"type": "http.response.start", "status": answer.status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def wait_for(self, count: int, timeout: float = 20.0) -> list[Received]:
        """Until ``count`` requests have arrived (all of them, in order)."""
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{len(self.received)} of {count} webhook requests arrived")
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                continue
        return list(self.received)


@dataclass(frozen=True)
class TestCA:
    """A certificate authority of the test's own, and a server certificate for ``localhost``."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def make_ca(directory: Path) -> TestCA:
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Tributary test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    found = TestCA(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    found.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    found.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    found.key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return found


@asynccontextmanager
async def receiver(tls: TestCA | None = None) -> AsyncIterator[Receiver]:
    """A receiver listening on 127.0.0.1 (``url`` names it by address; with ``tls``, HTTPS
    with a certificate for ``localhost`` only)."""
    port = free_port()
    scheme = "https" if tls else "http"
    found = Receiver(url=f"{scheme}://127.0.0.1:{port}/hook")
    options: dict[str, Any] = {}
    if tls is not None:
        options = {"ssl_certfile": str(tls.cert_file), "ssl_keyfile": str(tls.key_file)}
    server = uvicorn.Server(
        uvicorn.Config(
            found.app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="off",
            interface="asgi3",
            **options,
        )
    )
    task = asyncio.create_task(server.serve())

    async def started() -> bool:
        assert not task.done(), "the receiver died"
        return server.started

    await eventually(started, timeout=10, what="the webhook receiver to listen")
    try:
        yield found
    finally:
        server.should_exit = True
        await task
