from __future__ import annotations

from pydantic import Field, SecretStr

from tributary.service.settings import ServiceSettings

DEFAULT_CONCURRENCY = 8
"""Deliveries of one queue handled at once unless configured: SMTP round trips overlap."""


class Settings(ServiceSettings):
    database_url: str = Field(
        default="sqlite+aiosqlite:///var/email.db", validation_alias="EMAIL_DATABASE_URL"
    )
    port: int = Field(default=8003, validation_alias="EMAIL_PORT")
    smtp_host: str = Field(default="127.0.0.1", validation_alias="SMTP_HOST")
    smtp_port: int = Field(default=1025, ge=1, le=65535, validation_alias="SMTP_PORT")
    smtp_timeout: float = Field(default=10.0, gt=0, validation_alias="SMTP_TIMEOUT")
    """Seconds for connecting and for each SMTP reply; a timeout is retried like a 4xx."""
    smtp_connections: int = Field(
        default=4, ge=1, le=100, validation_alias="EMAIL_SMTP_CONNECTIONS"
    )
    """SMTP connections kept open and reused, one message at a time each."""
    smtp_max_messages: int = Field(default=100, ge=0, validation_alias="EMAIL_SMTP_MAX_MESSAGES")
    """Messages one connection carries before it is closed and a new one opened (0: no limit)."""
    concurrency: int | None = Field(
        default=None, ge=1, le=256, validation_alias="EMAIL_CONCURRENCY"
    )
    """Deliveries handled at once per queue (the runtime's consumer concurrency). Unset: the
    runtime's ``TRIBUTARY_CONCURRENCY`` when that is set, else :data:`DEFAULT_CONCURRENCY`."""
    claim_lease_seconds: float | None = Field(
        default=None, gt=0, validation_alias="EMAIL_CLAIM_LEASE_SECONDS"
    )
    """How long a claimed email (``sending``) belongs to the consumer that claimed it; past it
    another delivery takes it over and sends it (same Message-ID). Unset: 3 x SMTP_TIMEOUT."""
    smtp_from: str = Field(
        default="Tributary <no-reply@tributary.dev>", validation_alias="SMTP_FROM"
    )
    welcome_window_hours: float = Field(
        default=24.0, ge=0, validation_alias="EMAIL_WELCOME_WINDOW_HOURS"
    )
    """An address gets at most one welcome email in this many hours (0: no limit)."""
    address_key: SecretStr | None = Field(default=None, validation_alias="EMAIL_ADDRESS_KEY")
    """Key of the HMAC that stands in for an address where one must be remembered (the welcome
    window). Set it in production; unset, a development key is used and a warning logged."""

    @property
    def claim_lease(self) -> float:
        return self.claim_lease_seconds or 3 * self.smtp_timeout
