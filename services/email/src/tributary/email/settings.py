from __future__ import annotations

from pydantic import Field, SecretStr

from tributary.service.settings import ServiceSettings


class Settings(ServiceSettings):
    database_url: str = Field(
        default="sqlite+aiosqlite:///var/email.db", validation_alias="EMAIL_DATABASE_URL"
    )
    port: int = Field(default=8003, validation_alias="EMAIL_PORT")
    smtp_host: str = Field(default="127.0.0.1", validation_alias="SMTP_HOST")
    smtp_port: int = Field(default=1025, ge=1, le=65535, validation_alias="SMTP_PORT")
    smtp_timeout: float = Field(default=10.0, gt=0, validation_alias="SMTP_TIMEOUT")
    """Seconds for connecting and for each SMTP reply; a timeout is retried like a 4xx."""
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
