"""Identity's problems (RFC 9457 problem details), each naming the field it is about.

No email address, name or secret in any of them: error bodies end up in logs and traces.
"""

from __future__ import annotations

from tributary.service.problems import Problem, conflict, invalid, not_found


def user_not_found(user_id: str) -> Problem:
    return not_found(f"There is no user {user_id}.", field="path.user_id", message="no such user")


def key_not_found(key_id: str) -> Problem:
    return not_found(f"There is no API key {key_id}.", field="path.key_id", message="no such key")


def email_taken() -> Problem:
    # the address itself is left out
    return conflict(
        "The email address is already registered.",
        field="body.email",
        message="is already registered",
    )


def idempotency_key_reused() -> Problem:
    return invalid(
        "header.Idempotency-Key",
        "was already used with a different request body",
        "idempotency_key_reused",
    )
