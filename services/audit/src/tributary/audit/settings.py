from __future__ import annotations

from pydantic import Field, SecretStr

from tributary.service.settings import ServiceSettings


class Settings(ServiceSettings):
    database_url: str = Field(
        default="sqlite+aiosqlite:///var/audit.db", validation_alias="AUDIT_DATABASE_URL"
    )
    migration_database_url: str | None = Field(
        default=None, validation_alias="AUDIT_MIGRATION_DATABASE_URL"
    )
    """The tables' owner, for migrations and grants (default: AUDIT_DATABASE_URL)."""
    app_role: str | None = Field(
        default=None, pattern=r"^[a-z_][a-z0-9_]{0,62}$", validation_alias="AUDIT_APP_ROLE"
    )
    """PostgreSQL role the service runs as (AUDIT_DATABASE_URL's user): at start-up the owner
    grants it INSERT and SELECT on the log and what the runtime tables need, nothing more."""
    port: int = Field(default=8004, validation_alias="AUDIT_PORT")
    pii_key: SecretStr | None = Field(default=None, validation_alias="AUDIT_PII_KEY")
    """When set, PII fields are stored as keyed hashes (equal values stay comparable)."""
    checkpoint_every: int = Field(default=100, ge=1, validation_alias="AUDIT_CHECKPOINT_EVERY")
    """Sign a checkpoint after this many entries..."""
    checkpoint_seconds: float = Field(
        default=60.0, gt=0, validation_alias="AUDIT_CHECKPOINT_SECONDS"
    )
    """...or after this many seconds, whichever comes first (only if the head moved)."""
    signing_key: SecretStr | None = Field(default=None, validation_alias="AUDIT_SIGNING_KEY")
    """Ed25519 private key for checkpoints: PEM (PKCS#8) or base64 of the 32 raw bytes."""
    signing_key_file: str = Field(
        default="var/audit-signing-key", validation_alias="AUDIT_SIGNING_KEY_FILE"
    )
    """Where a key is generated (mode 0600) when AUDIT_SIGNING_KEY is unset, or read from."""

    jaeger_url: str = Field(
        default="http://localhost:16686", max_length=500, validation_alias="AUDIT_JAEGER_URL"
    )
    """Where the timeline page links a trace (``<jaeger_url>/trace/<trace id>``)."""
    identity_url: str | None = Field(
        default=None, max_length=500, validation_alias="AUDIT_IDENTITY_URL"
    )
    """Where the timeline page's login exchanges an API key for a token (``POST
    /oauth/token``); default: the token issuer, ``TRIBUTARY_AUTH_ISSUER``."""

    @property
    def pii_key_bytes(self) -> bytes | None:
        if self.pii_key is None or not self.pii_key.get_secret_value():
            return None
        return self.pii_key.get_secret_value().encode()
