"""Each service's own broker credentials, provisioned through the administrative connection.

``RABBITMQ_URL`` is the one broker setting a developer gives (``make dev``, the tests,
``eventctl``): an administrator's connection. :func:`provision_users` makes the catalog's
users in that URL's vhost (:mod:`tributary.eventctl.access`) with the passwords it is given,
and :func:`with_user` turns the administrative URL into each service's own. User names are
broker-wide, so each vhost's users carry a prefix (:func:`user_prefix_for`).

Provisioning goes through the management HTTP API where the broker has it (found on the
URL's host at port 15672, or given) and through ``rabbitmqctl`` on the broker's host
otherwise.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from tributary.contracts.catalog import catalog
from tributary.eventctl.access import AccessPlan, plan_access
from tributary.eventctl.admin import AdminError, vhost_of
from tributary.eventctl.provision import (
    DefinitionsBackend,
    ManagementDefinitions,
    RabbitmqctlDefinitions,
    provision,
)

MANAGEMENT_PORT = 15672
PROBE_TIMEOUT = 1.0


def user_prefix_for(vhost: str) -> str:
    """The user name prefix of a vhost's users: none for ``/``, else ``<vhost>.`` (characters
    outside ``[A-Za-z0-9_-]`` become ``_``)."""
    if vhost == "/":
        return ""
    return re.sub(r"[^A-Za-z0-9_-]", "_", vhost) + "."


def with_user(url: str, user: str, password: str) -> str:
    """``url`` (AMQP or HTTP) with its credentials replaced; host, port, vhost and query kept."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def management_base(amqp_url: str, port: int = MANAGEMENT_PORT) -> str:
    """``http://<the AMQP URL's host>:15672``, without credentials."""
    host = urlsplit(amqp_url).hostname or "127.0.0.1"
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def _answers(base: str, credentials_from: str) -> bool:
    """Whether the management API answers at ``base`` to the AMQP URL's user."""
    parts = urlsplit(credentials_from)
    user, password = unquote(parts.username or "guest"), unquote(parts.password or "guest")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(  # noqa: S310 (an http URL built here)
        f"{base}/api/whoami", headers={"Authorization": f"Basic {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT) as response:  # noqa: S310
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def choose_backend(
    admin_url: str,
    *,
    management_url: str | None = None,
    rabbitmqctl: str = "rabbitmqctl",
    node: str | None = None,
    env: Mapping[str, str] | None = None,
) -> DefinitionsBackend:
    """The management API when given or found on the broker's host, else ``rabbitmqctl``;
    :class:`AdminError` when neither is there."""
    if management_url:
        return ManagementDefinitions(management_url, credentials_from=admin_url)
    if node is None and _answers(base := management_base(admin_url), admin_url):
        return ManagementDefinitions(base, credentials_from=admin_url)
    if shutil.which(rabbitmqctl) is None:
        raise AdminError(
            f"cannot provision broker users: no management API on port {MANAGEMENT_PORT} of "
            f"the broker's host and no {rabbitmqctl} here (enable rabbitmq_management, or run "
            "on the broker's host, or pass --management-url)"
        )
    return RabbitmqctlDefinitions(executable=rabbitmqctl, node=node, env=env)


@dataclass(frozen=True)
class Credentials:
    """The users made in one vhost and each one's AMQP URL."""

    plan: AccessPlan
    user_prefix: str
    urls: Mapping[str, str]
    """Role (service, foreign producer, ``eventctl``) → its AMQP URL."""
    changes: tuple[str, ...]

    def url(self, role: str) -> str:
        return self.urls[role]


def random_password(_user: str) -> str:
    return secrets.token_urlsafe(24)


def derived_password(secret: str) -> Callable[[str], str]:
    """Passwords derived from one kept secret (HMAC-SHA256 of each user name): a developer
    keeps one value and every run provisions the same passwords (``make dev``)."""

    def password(user: str) -> str:
        return hmac.new(secret.encode(), user.encode(), hashlib.sha256).hexdigest()[:32]

    return password


async def provision_users(
    admin_url: str,
    *,
    name_prefix: str = "",
    user_prefix: str | None = None,
    password: Callable[[str], str] = random_password,
    backend: DefinitionsBackend | None = None,
) -> Credentials:
    """Make every catalog user in ``admin_url``'s vhost, each with ``password(user name)``
    (random by default). Idempotent: a second call with the same passwords changes nothing."""
    vhost = vhost_of(admin_url)
    prefix = user_prefix_for(vhost) if user_prefix is None else user_prefix
    plan = plan_access(catalog(), vhost=vhost, user_prefix=prefix, name_prefix=name_prefix)
    chosen = {user.name: password(user.name) for user in plan.users}
    changes = await provision(plan, chosen, backend or choose_backend(admin_url))
    urls = {user.role: with_user(admin_url, user.name, chosen[user.name]) for user in plan.users}
    return Credentials(plan=plan, user_prefix=prefix, urls=urls, changes=tuple(changes))


async def remove_users(plan: AccessPlan, backend: DefinitionsBackend) -> None:
    """Delete ``plan``'s users (test stacks clean up after themselves)."""
    await backend.delete_users([user.name for user in plan.users])
