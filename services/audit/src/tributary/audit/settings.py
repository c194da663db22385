from __future__ import annotations

from pydantic import Field, SecretStr

from tributary.service.settings import ServiceSettings


class Settings(ServiceSettings):
    database_url: str = Field(
        default="sqlite+aiosqlite:///var/audit.db", validation_alias="AUDIT_DATABASE_URL"
    )
    port: int = Field(default=8004, validation_alias="AUDIT_PORT")
    pii_key: SecretStr | None = Field(default=None, validation_alias="AUDIT_PII_KEY")
    """When set, PII fields are stored as keyed hashes (equal values stay comparable)."""

    @property
    def pii_key_bytes(self) -> bytes | None:
        if self.pii_key is None or not self.pii_key.get_secret_value():
            return None
        return self.pii_key.get_secret_value().encode()
