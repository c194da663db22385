"""The provider's settings (``PAYMENT_PROVIDER_*``)."""

from __future__ import annotations

from pydantic import Field, SecretStr

from tributary.service.settings import ServiceSettings

DEVELOPMENT_API_KEY = "pp_test_development_key"
DEVELOPMENT_WEBHOOK_SECRET = "whsec_ZGV2ZWxvcG1lbnQtd2ViaG9vay1zZWNyZXQtMzJieXQ="  # noqa: S105


class Settings(ServiceSettings):
    database_url: str = Field(
        default="sqlite+aiosqlite:///var/payment-provider.db",
        validation_alias="PAYMENT_PROVIDER_DATABASE_URL",
    )
    port: int = Field(default=8007, validation_alias="PAYMENT_PROVIDER_PORT")
    public_url: str = Field(
        default="http://127.0.0.1:8007",
        pattern=r"^https?://[^\s?#]+$",
        validation_alias="PAYMENT_PROVIDER_PUBLIC_URL",
    )
    """Where payers reach the provider: pay URLs start with it."""
    api_keys: list[SecretStr] = Field(
        default_factory=list, validation_alias="PAYMENT_PROVIDER_API_KEYS"
    )
    """The secret API keys merchants call the API with (``Authorization: Bearer <key>``), as
    a JSON list: several keys are active at once while one is rotated. Empty: a public
    development key, with a warning."""
    webhook_url: str | None = Field(
        default="http://127.0.0.1:8006/webhooks/payments",
        validation_alias="PAYMENT_PROVIDER_WEBHOOK_URL",
    )
    """Where the merchant receives webhooks (billing's ``POST /webhooks/payments``); unset:
    webhooks are recorded and never sent."""
    webhook_secret: SecretStr | None = Field(
        default=None, validation_alias="PAYMENT_PROVIDER_WEBHOOK_SECRET"
    )
    """The Standard Webhooks signing secret (``whsec_`` + base64 of 24 to 64 random bytes);
    unset: a public development secret, with a warning."""
    webhook_retry_seconds: tuple[float, ...] = Field(
        default=(5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0, 7200.0),
        validation_alias="PAYMENT_PROVIDER_WEBHOOK_RETRY_SECONDS",
    )
    """After a failed attempt (not 2xx, a timeout, no connection) the next waits this long;
    after the last, the message is given up (JSON list)."""
    webhook_timeout_seconds: float = Field(
        default=5.0, gt=0, validation_alias="PAYMENT_PROVIDER_WEBHOOK_TIMEOUT_SECONDS"
    )
    poll_seconds: float = Field(default=1.0, gt=0, validation_alias="PAYMENT_PROVIDER_POLL_SECONDS")
    """How often the sender looks for due work written by another process."""
    default_delay_seconds: float = Field(
        default=5.0, ge=0, validation_alias="PAYMENT_PROVIDER_DELAY_SECONDS"
    )
    """A ``delay`` payment succeeds after this long unless the payer gives ``delay_seconds``."""
