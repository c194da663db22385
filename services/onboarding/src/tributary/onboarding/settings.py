from __future__ import annotations

from pydantic import Field

from tributary.service.settings import ServiceSettings


class Settings(ServiceSettings):
    database_url: str = Field(
        default="sqlite+aiosqlite:///var/onboarding.db", validation_alias="ONBOARDING_DATABASE_URL"
    )
    port: int = Field(default=8002, validation_alias="ONBOARDING_PORT")
