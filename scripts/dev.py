"""``make dev``: every service as a local process against ``RABBITMQ_URL``.

Starts a development SMTP sink when ``SMTP_HOST`` is unset, prefixes each process's output
with its name, waits until every ``/health/ready`` answers, and stops everything on Ctrl-C or
SIGTERM. The environment is forwarded to every process.

Secrets: identity registers ``BOOTSTRAP_ADMIN_API_KEY`` as an owner's API key, and the email
service keys its address hashes with ``EMAIL_ADDRESS_KEY``. Unset, each is generated once into
``var/`` (mode 0600) and reused; how to get a bearer token is printed when all are ready.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import local_secrets  # scripts/local_secrets.py, beside this file

# name, port: the fixed local ports of the README
SERVICES: list[tuple[str, int]] = [
    ("identity", 8001),
    ("onboarding", 8002),
    ("email", 8003),
    ("audit", 8004),
]
COLORS = ["\033[36m", "\033[32m", "\033[35m", "\033[33m", "\033[34m", "\033[31m", "\033[37m"]
RESET = "\033[0m"


HOW_TO_CALL = """dev        | admin API key: {where} (the built-in admin user, role owner)
dev        | a token:  TOKEN=$(make -s token)   (scripts/access_token.py: client-credentials grant)
dev        | then:     curl -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8004/audit"""


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


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


async def main() -> int:
    env = dict(os.environ)
    env.setdefault("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
    env.setdefault("PYTHONUNBUFFERED", "1")
    os.makedirs("var", exist_ok=True)
    from_env = local_secrets.ADMIN_KEY in env
    for name in local_secrets.SECRETS:
        env[name] = local_secrets.for_dev(name)
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
        children.append(
            await _spawn(
                name, COLORS[i % len(COLORS)], sys.executable, "-m", f"tributary.{name}", env=env
            )
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
        print(HOW_TO_CALL.format(where=where), flush=True)
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
