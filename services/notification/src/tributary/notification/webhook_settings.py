"""The webhook channel's settings (``NOTIFICATION_WEBHOOK_*``), mixed into the service's."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, IPvAnyNetwork, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SVIX_SCHEDULE: tuple[float, ...] = (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
"""Immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h (as Svix retries)."""


class WebhookSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    webhook_retry_schedule: tuple[float, ...] = Field(
        default=SVIX_SCHEDULE, validation_alias="NOTIFICATION_WEBHOOK_RETRY_SCHEDULE"
    )
    """Seconds before each attempt of a delivery (a JSON list): the first entry is the wait
    before the first attempt (0: at once), each next one the wait after a failed attempt.
    Its length is the number of scheduled attempts."""
    webhook_timeout_seconds: float = Field(
        default=15.0, gt=0, le=30, validation_alias="NOTIFICATION_WEBHOOK_TIMEOUT_SECONDS"
    )
    """An attempt succeeds only with a 2xx answer within this time (resolution included). At
    most 30 s: the attempt runs inside a job handler, which the runtime stops after
    ``TRIBUTARY_HANDLER_TIMEOUT_SECONDS`` (60 s by default)."""
    webhook_disable_after_seconds: float = Field(
        default=5 * 86400, gt=0, validation_alias="NOTIFICATION_WEBHOOK_DISABLE_AFTER_SECONDS"
    )
    """An endpoint failing this long without a success is disabled (its user is told)."""
    webhook_rotation_seconds: float = Field(
        default=86400, ge=0, validation_alias="NOTIFICATION_WEBHOOK_ROTATION_SECONDS"
    )
    """After a secret rotation, the old secret keeps signing (a second signature) this long."""
    webhook_allow_loopback: bool = Field(
        default=False, validation_alias="NOTIFICATION_WEBHOOK_ALLOW_LOOPBACK"
    )
    """Allow loopback addresses (and plain http to them): development and tests only."""
    webhook_allowed_networks: tuple[IPvAnyNetwork, ...] = Field(
        default=(), validation_alias="NOTIFICATION_WEBHOOK_ALLOWED_NETWORKS"
    )
    """Networks allowed although private or reserved (a JSON list of CIDRs)."""
    webhook_endpoints_per_user: int = Field(
        default=10, ge=1, le=100, validation_alias="NOTIFICATION_WEBHOOK_ENDPOINTS_PER_USER"
    )
    webhook_ca_file: Path | None = Field(
        default=None, validation_alias="NOTIFICATION_WEBHOOK_CA_FILE"
    )
    """Certificates (PEM) to verify endpoints with instead of the system's (a private CA for
    endpoints in allowed networks)."""

    @field_validator("webhook_retry_schedule")
    @classmethod
    def _schedule(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not 1 <= len(value) <= 20:
            raise ValueError("between 1 and 20 attempts")
        if any(not 0 <= delay <= 7 * 86400 for delay in value):
            raise ValueError("each wait between 0 and 7 days (in seconds)")
        return value
