from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tributary.contracts.envelope import new_event
from tributary.contracts.events import UserCreatedV2
from tributary.messaging.testing import OutcomeRecorder, delete_prefixed, publish_raw
from tributary.service.testing import running
from tributary.testkit.infra import Found

from .test_tracing import build


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


async def test_duplicates_and_dead_letters_show_in_the_metrics(
    tmp_path: Path, rabbitmq: Found
) -> None:
    app = build(tmp_path, rabbitmq.url)
    recorder = OutcomeRecorder()
    try:
        async with running(app) as client:
            bus = app.state.bus
            bus.listeners.append(recorder)
            event = new_event(
                routing_key="user.created.v2",
                source="/tests",
                data=UserCreatedV2.model_validate(
                    {
                        "user_id": "usr_metrics0001",
                        "email": "ada@example.com",
                        "given_name": "Ada",
                        "family_name": "L",
                        "plan": "pro",
                        "locale": "en-GB",
                        "created_at": "2026-01-01T00:00:00Z",
                    }
                ),
            )
            for _ in range(2):
                await publish_raw(rabbitmq.url, bus.names, "user.created.v2", event.to_bytes())
            await publish_raw(rabbitmq.url, bus.names, "user.created.v2", b"not json")
            await recorder.wait_until_handled(event.id, "duplicate")
            await recorder.wait_for_count("dead_lettered", 1)
            await recorder.wait(lambda: bus.relay.stats.published >= 1)

            text = (await client.get("/metrics")).text
            samples = _samples(text)
            consumed = "tributary_events_consumed_total"
            base = {("service", "obs"), ("consumer", "obs")}
            assert samples[(consumed, frozenset(base | {("outcome", "duplicate")}))] == 1
            assert samples[(consumed, frozenset(base | {("outcome", "dead_lettered")}))] == 1
            dead = "tributary_dead_letters_total"
            assert samples[(dead, frozenset(base | {("reason", "malformed")}))] == 1
            assert [k for k in samples if k[0] == dead] == [
                (dead, frozenset(base | {("reason", "malformed")}))
            ]
            assert samples[(consumed, frozenset(base | {("outcome", "processed")}))] >= 2
            dlq = bus.names.service_queues("obs", 2).dlq
            assert samples[("tributary_dlq_depth", frozenset({("queue", dlq)}))] == 1
            assert (
                samples[("tributary_events_published_total", frozenset({("service", "obs")}))] >= 1
            )
            assert ("tributary_outbox_pending", frozenset({("service", "obs")})) in samples
            assert samples[("tributary_consumer_paused", frozenset(base))] == 0
            assert any(name == "tributary_handler_duration_seconds_count" for name, _ in samples)
            assert any(name == "tributary_event_backlog_age_seconds_count" for name, _ in samples)
    finally:
        bus = app.state.bus
        qs = bus.names.service_queues("obs", len(bus.settings.retry_tiers))
        await delete_prefixed(rabbitmq.url, bus.names, [qs.work, qs.dlq, *qs.retries])
