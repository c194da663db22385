"""Billing's settings (``BILLING_*``)."""

from __future__ import annotations

from pydantic import Field, SecretStr

from tributary.service.settings import ServiceSettings

DEVELOPMENT_PROVIDER_API_KEY = "pp_test_development_key"
DEVELOPMENT_WEBHOOK_SECRET = "whsec_ZGV2ZWxvcG1lbnQtd2ViaG9vay1zZWNyZXQtMzJieXQ="  # noqa: S105


class Settings(ServiceSettings):
    database_url: str = Field(
        default="sqlite+aiosqlite:///var/billing.db", validation_alias="BILLING_DATABASE_URL"
    )
    migration_database_url: str | None = Field(
        default=None, validation_alias="BILLING_MIGRATION_DATABASE_URL"
    )
    port: int = Field(default=8006, validation_alias="BILLING_PORT")
    provider_url: str = Field(
        default="http://127.0.0.1:8007",
        pattern=r"^https?://[^\s?#]+$",
        validation_alias="BILLING_PROVIDER_URL",
    )
    """The payment provider's API."""
    provider_api_key: SecretStr | None = Field(
        default=None, validation_alias="BILLING_PROVIDER_API_KEY"
    )
    """Billing's secret API key at the provider; unset: the provider's development key."""
    provider_timeout_seconds: float = Field(
        default=5.0, gt=0, validation_alias="BILLING_PROVIDER_TIMEOUT_SECONDS"
    )
    webhook_secrets: list[SecretStr] = Field(
        default_factory=list, validation_alias="BILLING_WEBHOOK_SECRETS"
    )
    """The provider's webhook signing secrets (``whsec_…``) as a JSON list: a webhook signed
    with any of them is accepted, so a secret is rotated by adding the new one, switching the
    provider over, then removing the old. Empty: the development secret, with a warning."""
    webhook_max_bytes: int = Field(
        default=16 * 1024, ge=256, validation_alias="BILLING_WEBHOOK_MAX_BYTES"
    )
    """A webhook body larger than this is refused (413) unread."""
    activation_timeout_seconds: float = Field(
        default=300, gt=0, validation_alias="BILLING_ACTIVATION_TIMEOUT_SECONDS"
    )
    """How long identity has to activate a paid plan (``subscription.activated``) before the
    saga refunds the payment and cancels the subscription."""
    command_retries: int = Field(default=10, ge=1, validation_alias="BILLING_COMMAND_RETRIES")
    """Attempts of a command that may be retried when another writer appended to its
    subscription first (optimistic concurrency)."""
