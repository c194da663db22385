"""The bootstrap admin API key of a local installation: where it is kept, made when missing.

``make dev`` keeps it in ``var/bootstrap-admin-api-key``; ``make demo`` in ``.env`` (which
Compose reads for ``${BOOTSTRAP_ADMIN_API_KEY}``). Both files are git-ignored and mode 0600.
``BOOTSTRAP_ADMIN_API_KEY`` in the environment wins over either.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

DEV_FILE = Path("var/bootstrap-admin-api-key")
COMPOSE_ENV = Path(".env")
VARIABLE = "BOOTSTRAP_ADMIN_API_KEY"


def new_key() -> str:
    """A secret of the shape identity issues (``trib_`` + 256 random bits)."""
    return f"trib_{secrets.token_urlsafe(32)}"


def _private_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(text)


def from_env_file(path: Path = COMPOSE_ENV) -> str | None:
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        name, _, value = line.partition("=")
        if name.strip() == VARIABLE and value.strip():
            return value.strip().strip("'\"")
    return None


def find() -> str | None:
    """The key a client should use: the environment, else make dev's file, else ``.env``."""
    if key := os.environ.get(VARIABLE):
        return key
    if DEV_FILE.exists():
        return DEV_FILE.read_text().strip() or None
    return from_env_file()


def for_dev() -> str:
    """``make dev``'s key: the environment's, else the one kept in var/, else a new one."""
    if key := os.environ.get(VARIABLE):
        return key
    if DEV_FILE.exists() and (key := DEV_FILE.read_text().strip()):
        return key
    key = new_key()
    _private_write(DEV_FILE, key + "\n")
    return key


def ensure_compose_env() -> None:
    """``make demo``: add a key to ``.env`` unless the environment or ``.env`` has one."""
    if os.environ.get(VARIABLE) or from_env_file():
        return
    existing = COMPOSE_ENV.read_text() if COMPOSE_ENV.exists() else ""
    if existing and not existing.endswith("\n"):
        existing += "\n"
    _private_write(COMPOSE_ENV, f"{existing}{VARIABLE}={new_key()}\n")
    print(f"{VARIABLE} written to .env (get a token with: make token)", file=sys.stderr)


if __name__ == "__main__":
    if sys.argv[1:] == ["ensure-compose-env"]:
        ensure_compose_env()
    else:
        print("usage: python scripts/admin_key.py ensure-compose-env", file=sys.stderr)
        sys.exit(2)
