from __future__ import annotations

from pydantic import Field

from tributary.service.settings import ServiceSettings


class Settings(ServiceSettings):
    database_url: str = Field(
        default="sqlite+aiosqlite:///var/identity.db", validation_alias="IDENTITY_DATABASE_URL"
    )
    port: int = Field(default=8001, validation_alias="IDENTITY_PORT")
