"""Each service's own credentials from the administrative URL (``make dev``, the test stacks)."""

from __future__ import annotations

import json
import subprocess
import uuid
from urllib.parse import unquote, urlsplit

import aio_pika
import pytest
from aiormq.exceptions import ProbableAuthenticationError
from hypothesis import given
from hypothesis import strategies as st

from tributary.eventctl.admin import AdminError
from tributary.eventctl.credentials import (
    choose_backend,
    derived_password,
    provision_users,
    remove_users,
    user_prefix_for,
    with_user,
)
from tributary.eventctl.provision import RabbitmqctlDefinitions
from tributary.testkit.infra import Found


def test_the_default_vhost_has_no_prefix_and_others_their_name() -> None:
    assert user_prefix_for("/") == ""
    assert user_prefix_for("team-a") == "team-a."
    assert user_prefix_for("a/b c") == "a_b_c."


@given(
    user=st.text(min_size=1, max_size=40),
    password=st.text(min_size=1, max_size=40),
    vhost=st.sampled_from(["", "/", "/team-a", "/%2F"]),
)
def test_any_user_and_password_survive_the_url(user: str, password: str, vhost: str) -> None:
    url = with_user(f"amqp://guest:guest@127.0.0.1:5673{vhost}?heartbeat=5", user, password)
    parts = urlsplit(url)
    assert (unquote(parts.username or ""), unquote(parts.password or "")) == (user, password)
    assert (parts.hostname, parts.port, parts.path, parts.query) == (
        "127.0.0.1",
        5673,
        vhost,
        "heartbeat=5",
    )


def test_derived_passwords_are_stable_per_user_and_secret() -> None:
    one, other = derived_password("s1"), derived_password("s2")
    assert one("identity") == one("identity") != one("email")
    assert one("identity") != other("identity")


def test_without_management_api_or_rabbitmqctl_the_error_says_what_to_do() -> None:
    with pytest.raises(AdminError, match="rabbitmq_management"):
        # nothing listens on port 1's host management port; no such executable
        choose_backend("amqp://guest:guest@127.0.0.1:1/", rabbitmqctl="no-such-rabbitmqctl")


def _users() -> set[str]:
    out = subprocess.run(
        ["rabbitmqctl", "list_users", "--formatter", "json", "-q"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {str(u["user"]) for u in json.loads(out)}


async def test_provisioned_users_connect_and_are_removed(rabbitmq: Found) -> None:
    assert rabbitmq.controllable, "this test provisions the local broker with rabbitmqctl"
    prefix = f"t-cred-{uuid.uuid4().hex[:8]}."
    backend = RabbitmqctlDefinitions()
    made = await provision_users(
        rabbitmq.url, name_prefix=prefix, user_prefix=prefix, backend=backend
    )
    try:
        assert made.changes
        connection = await aio_pika.connect(made.url("onboarding"))
        await connection.close()
        again = await provision_users(
            rabbitmq.url,
            name_prefix=prefix,
            user_prefix=prefix,
            password=lambda name: unquote(urlsplit(made.urls[name[len(prefix) :]]).password or ""),
            backend=backend,
        )
        assert again.changes == ()  # the same passwords: nothing to do
    finally:
        await remove_users(made.plan, backend)
    assert not {u for u in _users() if u.startswith(prefix)}
    with pytest.raises(ProbableAuthenticationError):
        await aio_pika.connect(made.url("onboarding"))
