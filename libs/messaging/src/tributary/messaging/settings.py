"""Messaging settings, read from the environment at start-up."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

BROKER_SCHEMES = ("amqp://", "amqps://")


def split_urls(value: str) -> tuple[str, ...]:
    """``"amqp://a/, amqp://b/"`` → ``("amqp://a/", "amqp://b/")``; blanks are dropped."""
    return tuple(part.strip() for part in value.split(",") if part.strip())


class MessagingSettings(BaseSettings):
    """Broker, consumer and outbox knobs; every field can be set as ``TRIBUTARY_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="TRIBUTARY_", extra="ignore", frozen=True)

    rabbitmq_url: str = Field(
        default="amqp://guest:guest@127.0.0.1:5672/",
        validation_alias=AliasChoices("RABBITMQ_URL", "TRIBUTARY_RABBITMQ_URL"),
    )
    """The broker; with ``rabbitmq_urls`` set and this not, the first of those."""
    rabbitmq_urls: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        validation_alias=AliasChoices("RABBITMQ_URLS", "TRIBUTARY_RABBITMQ_URLS"),
    )
    """The nodes of a cluster, comma-separated: connections go to the first that answers and,
    when it is lost, to the next (see :attr:`broker_urls`)."""
    connect_timeout_seconds: float = Field(default=10.0, gt=0)
    """Longest wait for one connection attempt to a node (one that accepts TCP but does not
    answer, a stopped or overloaded node, is left for the next after this)."""
    name_prefix: str = ""
    """Prefix for every exchange and queue name (isolates test runs on a shared broker)."""
    prefetch: int = Field(default=256, ge=1)
    concurrency: int = Field(default=1, ge=1)
    """Worker tasks per queue; each handles one batch at a time."""
    partition_stagger_seconds: float = Field(default=1.0, ge=0)
    """Pause between subscribing to one partition queue and the next, so that replicas started
    together each become the active consumer of different partitions."""
    batch_max: int = Field(default=100, ge=1)
    """Deliveries handled in one transaction when they are already waiting; 1 = off."""
    inprocess_retries: int = Field(default=3, ge=1)
    """Attempts inside the process (with backoff and jitter) before a delayed retry."""
    inprocess_backoff_seconds: float = Field(default=0.05, ge=0)
    retry_tiers: tuple[float, ...] = (1.0, 10.0, 60.0)
    """Delays (seconds) of the delayed-retry queues ``<service>.retry.<n>``."""
    delivery_limit: int = Field(default=10, ge=1)
    """Quorum-queue redeliveries before the broker dead-letters a message (crash loops)."""
    publish_in_flight: int = Field(default=256, ge=1)
    outbox_batch: int = Field(default=500, ge=1)
    outbox_poll_seconds: float = Field(default=1.0, gt=0)
    """Fallback poll for rows committed by other processes; commits here wake the relay."""
    outbox_replay_window_hours: float = Field(default=168.0, ge=0)
    """How long published outbox rows are kept for replay before the purge."""
    outbox_purge_seconds: float = Field(default=300.0, gt=0)
    shutdown_grace_seconds: float = Field(default=10.0, ge=0)
    handler_timeout_seconds: float = Field(default=60.0, gt=0)
    """A handler running longer fails that message (it goes through the retry tiers)."""
    publish_timeout_seconds: float = Field(default=15.0, gt=0)
    """Longest wait for a publisher confirm (a blocked or dead broker) before it counts as down."""
    pause_probe_max_seconds: float = Field(default=10.0, gt=0)
    """Longest back-off between probes while consumption is paused by an outage."""
    inbox_retention_days: float = Field(default=14.0, gt=0)
    """Inbox rows older than this are purged; a replay of older events is not deduplicated."""
    purge_chunk: int = Field(default=1000, ge=1)
    """Rows deleted per statement by the outbox and inbox purges."""
    broker_user_prefix: str = ""
    """Prefix of the broker user names (``eventctl broker provision --prefix``)."""
    verify_sender: bool = False
    """Check every delivery's sender (its ``user_id``) against the catalog's producers and
    dead-letter the others as ``unauthorized_producer``; needs the per-service broker users."""

    @field_validator("rabbitmq_urls", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return split_urls(value) if isinstance(value, str) else value

    @field_validator("rabbitmq_urls")
    @classmethod
    def _amqp_only(cls, urls: tuple[str, ...]) -> tuple[str, ...]:
        for url in urls:
            if not url.startswith(BROKER_SCHEMES):
                raise ValueError(f"not an AMQP URL (amqp:// or amqps://): {url.split('@')[-1]!r}")
        return urls

    @model_validator(mode="after")
    def _first_node_is_the_url(self) -> MessagingSettings:
        if self.rabbitmq_urls and "rabbitmq_url" not in self.model_fields_set:
            # tools that speak to one node (eventctl, test clean-up) use the first
            object.__setattr__(self, "rabbitmq_url", self.rabbitmq_urls[0])
        return self

    @property
    def broker_urls(self) -> tuple[str, ...]:
        """Every node to connect to, in order: ``rabbitmq_urls``, else ``rabbitmq_url``."""
        return self.rabbitmq_urls or (self.rabbitmq_url,)
