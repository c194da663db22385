"""``eventctl broker provision --management-url``: the same plan through ``/api/definitions``.

The local broker has no management plugin, so a small stand-in serves the two calls the
command makes (GET and POST ``/api/definitions``) and merges imports the way RabbitMQ does.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tributary.eventctl.cli import main_async

KEYS = {
    "users": ("name",),
    "vhosts": ("name",),
    "permissions": ("user", "vhost"),
    "topic_permissions": ("user", "vhost", "exchange"),
}


class FakeManagement:
    def __init__(self) -> None:
        self.definitions: dict[str, list[dict[str, Any]]] = {
            "users": [{"name": "guest", "password_hash": "x", "tags": ["administrator"]}],
            "vhosts": [{"name": "/"}],
            "permissions": [],
            "topic_permissions": [],
        }
        self.posts = 0
        self.authorizations: set[str] = set()

    def load(self, patch: dict[str, list[dict[str, Any]]]) -> None:
        self.posts += 1
        for section, rows in patch.items():
            key = KEYS[section]
            current = self.definitions[section]
            for row in rows:
                current[:] = [
                    r for r in current if tuple(r[k] for k in key) != tuple(row[k] for k in key)
                ]
                current.append(row)


@pytest.fixture
def management() -> Iterator[tuple[str, FakeManagement]]:
    fake = FakeManagement()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _answer(self, status: int, body: bytes = b"") -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            fake.authorizations.add(self.headers.get("Authorization", ""))
            if self.path != "/api/definitions":
                self._answer(404)
                return
            self._answer(200, json.dumps(fake.definitions).encode())

        def do_POST(self) -> None:
            fake.authorizations.add(self.headers.get("Authorization", ""))
            length = int(self.headers.get("Content-Length", "0"))
            fake.load(json.loads(self.rfile.read(length)))
            self._answer(204)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://admin:secret@127.0.0.1:{server.server_address[1]}", fake
    finally:
        server.shutdown()
        server.server_close()


async def test_provision_through_the_management_api(
    management: tuple[str, FakeManagement], capsys: pytest.CaptureFixture[str]
) -> None:
    url, fake = management
    args = ["broker", "provision", "--management-url", url, "--vhost", "v", "--prefix", "v."]
    args += ["--url", "amqp://guest:guest@127.0.0.1:5672/", "--name-prefix", ""]

    assert await main_async(args) == 0
    first = capsys.readouterr().out
    assert "vhost v: created" in first
    assert "user v.identity: created, tags []" in first
    assert fake.posts == 1
    assert {u["name"] for u in fake.definitions["users"]} >= {"guest", "v.identity", "v.eventctl"}
    assert fake.definitions["users"][0]["name"] == "guest"  # left alone
    token = base64.b64encode(b"admin:secret").decode()
    assert fake.authorizations == {f"Basic {token}"}

    assert await main_async(args) == 0
    assert capsys.readouterr().out.strip() == "provisioned vhost v: 9 users, 0 change(s)"
    assert fake.posts == 1


async def test_an_unreachable_management_api_is_an_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["broker", "provision", "--management-url", "http://127.0.0.1:9/", "--vhost", "v"]
    assert await main_async([*args, "--name-prefix", ""]) == 2
    assert "management API GET" in capsys.readouterr().err
