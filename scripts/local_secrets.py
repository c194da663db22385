"""The secrets of a local installation: where they are kept, made when missing.

``BOOTSTRAP_ADMIN_API_KEY`` (the built-in owner's API key), ``EMAIL_ADDRESS_KEY`` (the
email service's HMAC key for addresses it must remember), ``NOTIFICATION_UNSUBSCRIBE_KEY``
(signs the one-click unsubscribe links), ``BILLING_PROVIDER_API_KEY`` (billing's secret API
key at the payment provider, which accepts it) and ``PAYMENT_PROVIDER_WEBHOOK_SECRET`` (the
provider signs its webhooks with it, billing verifies them with it); for ``make dev`` only,
``TRIBUTARY_BROKER_SECRET`` (each broker user's password is derived from it). ``make dev``
keeps them in ``var/<name>``; ``make demo`` in ``.env``, which Compose reads for ``${NAME}``.
Both are git-ignored and written mode 0600. A value in the environment wins over either.
"""

from __future__ import annotations

import base64
import os
import secrets
import sys
from pathlib import Path

ADMIN_KEY = "BOOTSTRAP_ADMIN_API_KEY"
SECRETS: dict[str, str] = {
    ADMIN_KEY: "trib_",  # the shape identity issues: trib_ + 256 random bits
    "EMAIL_ADDRESS_KEY": "",
    "NOTIFICATION_UNSUBSCRIBE_KEY": "",
    "BILLING_PROVIDER_API_KEY": "pp_",
    "PAYMENT_PROVIDER_WEBHOOK_SECRET": "whsec_",
}
WEBHOOK_SECRET = "PAYMENT_PROVIDER_WEBHOOK_SECRET"  # noqa: S105 (a variable name)
BROKER_SECRET = "TRIBUTARY_BROKER_SECRET"  # noqa: S105 (a variable name)
DEV_ONLY: dict[str, str] = {
    # make dev derives each broker user's password from it (the demo uses public ones)
    BROKER_SECRET: "",
}
DEV_DIR = Path("var")
COMPOSE_ENV = Path(".env")


def dev_file(name: str) -> Path:
    return DEV_DIR / name.lower().replace("_", "-")


def new_value(name: str) -> str:
    if name == WEBHOOK_SECRET:  # Standard Webhooks: whsec_ + standard base64 of the key
        return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    return f"{SECRETS.get(name, DEV_ONLY.get(name, ''))}{secrets.token_urlsafe(32)}"


def private_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(text)


def from_env_file(name: str, path: Path = COMPOSE_ENV) -> str | None:
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == name and value.strip():
            return value.strip().strip("'\"")
    return None


def find(name: str = ADMIN_KEY) -> str | None:
    """A secret as a client sees it: the environment, else make dev's file, else ``.env``."""
    if value := os.environ.get(name):
        return value
    if dev_file(name).exists():
        return dev_file(name).read_text().strip() or None
    return from_env_file(name)


def for_dev(name: str) -> str:
    """``make dev``'s value: the environment's, else the one kept in var/, else a new one."""
    if value := os.environ.get(name):
        return value
    path = dev_file(name)
    if path.exists() and (value := path.read_text().strip()):
        return value
    value = new_value(name)
    private_write(path, value + "\n")
    return value


def ensure_compose_env() -> None:
    """``make demo``: add each missing secret to ``.env`` (the environment's are kept)."""
    existing = COMPOSE_ENV.read_text() if COMPOSE_ENV.exists() else ""
    if existing and not existing.endswith("\n"):
        existing += "\n"
    added = [n for n in SECRETS if not (os.environ.get(n) or from_env_file(n))]
    if added:
        lines = "".join(f"{name}={new_value(name)}\n" for name in added)
        private_write(COMPOSE_ENV, existing + lines)
        print(f"{', '.join(added)} written to .env (a token: make token)", file=sys.stderr)


if __name__ == "__main__":
    if sys.argv[1:] == ["ensure-compose-env"]:
        ensure_compose_env()
    else:
        print("usage: python scripts/local_secrets.py ensure-compose-env", file=sys.stderr)
        sys.exit(2)
