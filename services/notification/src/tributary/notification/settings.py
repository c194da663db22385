from __future__ import annotations

from pydantic import Field, SecretStr

from tributary.notification.webhook_settings import WebhookSettings
from tributary.service.settings import ServiceSettings


class Settings(ServiceSettings, WebhookSettings):
    database_url: str = Field(
        default="sqlite+aiosqlite:///var/notification.db",
        validation_alias="NOTIFICATION_DATABASE_URL",
    )
    port: int = Field(default=8005, validation_alias="NOTIFICATION_PORT")
    public_url: str = Field(
        default="http://127.0.0.1:8005",
        pattern=r"^https?://[^\s?#]+$",
        validation_alias="NOTIFICATION_PUBLIC_URL",
    )
    """Where mail readers reach this service: the unsubscribe links start with it (HTTPS in
    production: RFC 8058 one-click unsubscribe links must be HTTPS)."""
    unsubscribe_key: SecretStr | None = Field(
        default=None, validation_alias="NOTIFICATION_UNSUBSCRIBE_KEY"
    )
    """Key of the HMAC that signs unsubscribe tokens. Set it in production (32 random bytes or
    more); unset, a development key is used and a warning logged. Changing it invalidates every
    link already mailed."""
    unsubscribe_ttl_days: float = Field(
        default=60.0, gt=0, validation_alias="NOTIFICATION_UNSUBSCRIBE_TTL_DAYS"
    )
    """How long an unsubscribe link in a mail keeps working."""
    sse_heartbeat_seconds: float = Field(
        default=15.0, gt=0, validation_alias="NOTIFICATION_SSE_HEARTBEAT_SECONDS"
    )
    """A comment line on an idle stream this often (proxies close silent connections)."""
    sse_poll_seconds: float = Field(
        default=5.0, gt=0, validation_alias="NOTIFICATION_SSE_POLL_SECONDS"
    )
    """An idle stream also reads the database this often: notifications committed by another
    replica reach it within this time (this process's own commits wake it at once)."""
    sse_retry_ms: int = Field(default=3000, ge=0, validation_alias="NOTIFICATION_SSE_RETRY_MS")
    """The reconnection delay a stream tells its client (the SSE ``retry`` field)."""
    sse_streams_per_user: int = Field(
        default=10, ge=1, validation_alias="NOTIFICATION_SSE_STREAMS_PER_USER"
    )
    """Open streams one user may hold in one process; one more is answered 429."""
    digest_window_seconds: float = Field(
        default=600.0, gt=0, le=86400, validation_alias="NOTIFICATION_DIGEST_WINDOW_SECONDS"
    )
    """Mentions of one user within this long of the first become one email (a digest); in-app
    stays immediate."""
