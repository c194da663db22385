"""A real headless Chromium driven over the Chrome DevTools protocol (no WebDriver needed).

Debian's ``chromium`` package (``.ci/run`` installs it when missing); ``CHROMIUM`` names
another binary. Everything a page logs as an error -- ``console.error``, an uncaught
exception, a failed load, a Content-Security-Policy violation -- is collected in ``errors``.
Keys are sent as real key events (``Input.dispatchKeyEvent``), so Tab moves the focus and Enter
submits a form as they would for a person.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import urllib.request
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

from tributary.testkit.waiting import wait_until

KEYS: dict[str, dict[str, Any]] = {
    "Tab": {"key": "Tab", "code": "Tab", "windowsVirtualKeyCode": 9},
    "Enter": {"key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13, "text": "\r"},
}


def chromium_binary() -> str | None:
    """The Chromium to drive, or None when this machine has none."""
    named = os.environ.get("CHROMIUM")
    if named:
        return named if shutil.which(named) else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    return None


def _alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


class Browser:
    """One headless Chromium with one page; ``with Browser(binary) as page: ...``."""

    def __init__(self, binary: str, *, width: int = 1440, height: int = 900) -> None:
        self.binary = binary
        self.size = (width, height)
        self.errors: list[str] = []
        self._ids = itertools.count(1)
        self._profile = tempfile.TemporaryDirectory(
            prefix="tributary-chromium-", ignore_cleanup_errors=True
        )
        self._process: subprocess.Popen[bytes] | None = None
        self._ws: ClientConnection | None = None
        self._exit = ExitStack()
        self._events: list[dict[str, Any]] = []

    def __enter__(self) -> Browser:
        profile = Path(self._profile.name)
        self._process = subprocess.Popen(
            [
                self.binary,
                "--headless=new",
                "--no-sandbox",  # root in CI containers
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                f"--window-size={self.size[0]},{self.size[1]}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stopped with every child
        )
        active = profile / "DevToolsActivePort"
        wait_until(
            lambda: active.exists() and len(active.read_text().splitlines()) >= 2,
            timeout=30,
            what="Chromium's DevTools port",
        )
        port = int(active.read_text().splitlines()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
            targets = json.load(answer)
        [page] = [t for t in targets if t.get("type") == "page"][:1]
        self._ws = self._exit.enter_context(
            connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=10)
        )
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")
        # a headless window never has the system's focus: let the page behave as if it had
        self.send("Emulation.setFocusEmulationEnabled", {"enabled": True})
        return self

    def __exit__(self, *exc: object) -> None:
        self._exit.close()
        if self._process is not None:
            group = self._process.pid  # the group this browser leads (start_new_session)
            with suppress(ProcessLookupError):
                os.killpg(group, signal.SIGTERM)
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(group, signal.SIGKILL)
                self._process.wait()
            wait_until(lambda: not _alive(group), timeout=10, what="Chromium stopped")
        self._profile.cleanup()

    # -- protocol ----------------------------------------------------------------------------

    def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        assert self._ws is not None
        call = next(self._ids)
        self._ws.send(json.dumps({"id": call, "method": method, "params": params or {}}))
        while True:
            message = json.loads(self._ws.recv(timeout=30))
            if message.get("id") == call:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result
            self._event(message)

    def _event(self, message: dict[str, Any]) -> None:
        method, params = message.get("method"), message.get("params", {})
        self._events.append(message)
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            texts = [str(a.get("value", a.get("description", ""))) for a in params.get("args", [])]
            self.errors.append("console: " + " ".join(texts))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            exception = details.get("exception", {}).get("description") or details.get("text")
            self.errors.append(f"exception: {exception}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            self.errors.append(
                f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}"
            )

    def pump(self) -> None:
        """Read the events that arrived meanwhile (console messages...)."""
        self.send("Runtime.evaluate", {"expression": "0"})

    # -- what a test does --------------------------------------------------------------------

    def open(self, url: str) -> None:
        self._events.clear()
        self.send("Page.navigate", {"url": url})
        wait_until(
            lambda: self.evaluate("document.readyState") == "complete",
            timeout=20,
            what=f"{url} loaded",
        )

    def evaluate(self, expression: str) -> Any:
        result = self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result.get("result", {}).get("value")

    def press(self, key: str, *, shift: bool = False) -> None:
        spec = {**KEYS[key], "modifiers": 8 if shift else 0}
        self.send("Input.dispatchKeyEvent", {"type": "keyDown", **spec})
        self.send(
            "Input.dispatchKeyEvent",
            {"type": "keyUp", **{k: v for k, v in spec.items() if k != "text"}},
        )

    def type(self, text: str) -> None:
        self.send("Input.insertText", {"text": text})

    def focused(self) -> str:
        """The id of the element that has the focus, else its tag and text ('body: ...')."""
        return str(
            self.evaluate(
                "(e => e.id || `${e.tagName.toLowerCase()}: ${e.textContent.trim()}`)"
                "(document.activeElement)"
            )
        )

    def wait_for(self, expression: str, *, timeout: float = 20, what: str = "") -> Any:
        return wait_until(
            lambda: self.evaluate(expression), timeout=timeout, what=what or expression
        )

    def screenshot(self, path: Path) -> None:
        """The whole page (beyond the window) as a PNG."""
        metrics = self.send("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        width = max(self.size[0], int(size["width"]))
        height = int(size["height"])
        shot = self.send(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
            },
        )
        path.write_bytes(base64.b64decode(shot["data"]))
