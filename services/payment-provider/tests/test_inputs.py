"""Whatever a merchant or a payer sends, the provider answers with a 2xx or a 4xx problem."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tributary.payment_provider.testing import TEST_API_KEY, running_provider

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "amount_cents": st.integers(min_value=-5, max_value=2**70) | JSON,
        "currency": st.sampled_from(["EUR", "eur", "EURO", ""]) | JSON,
        "reference": st.text(max_size=120) | JSON,
        "metadata": st.dictionaries(st.text(max_size=50), st.text(max_size=250), max_size=25)
        | JSON,
        "outcome": st.sampled_from(["succeed", "decline", "delay", "maybe"]) | JSON,
        "delay_seconds": st.floats(allow_nan=False, allow_infinity=False) | JSON,
        "decline_reason": st.text(max_size=250) | JSON,
    },
)


def fuzz(url: str, checkout_id: str) -> None:
    paths = ("/checkouts", f"/checkouts/{checkout_id}/pay", f"/payments/{checkout_id}/refunds")
    with httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {TEST_API_KEY}"}, timeout=10
    ) as client:

        @settings(
            max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        @given(
            body=FIELDS | JSON,
            key=st.none()
            # HTTP trims a header value's outer spaces (the client refuses to send them)
            | st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=210).map(
                str.strip
            ),
            path=st.sampled_from(paths),
        )
        def post(body: Any, key: str | None, path: str) -> None:
            headers = {} if key is None else {"Idempotency-Key": key}
            answer = client.post(path, json=body, headers=headers)
            assert answer.status_code < 500, (path, answer.text)
            if answer.status_code >= 400:
                assert answer.headers["content-type"].startswith("application/problem+json")

        post()


# Hypothesis flags a strategy that uses the global `random` by comparing its state around each
# draw; the server runs on the event loop meanwhile (as may what other tests left running),
# which it would take for the strategy's doing.
@pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")
async def test_any_body_gets_an_answer_and_no_server_error(sqlite_url: str) -> None:
    async with running_provider(sqlite_url, None) as provider:
        checkout = await provider.checkout(reference="fuzz")
        # the client calls synchronously: in a thread, while the server runs on this loop
        await asyncio.to_thread(fuzz, provider.url, checkout["id"])
