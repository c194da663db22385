"""Base settings of a service; each service subclasses with its own env names (README §10)."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """Subclasses declare ``database_url`` and ``port`` with their ``<SERVICE>_*`` aliases."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    database_url: str
    migration_database_url: str | None = None
    """When set, migrations run with this URL (a role owning the tables) and the service
    with ``database_url`` (a role with only the privileges it needs); else both use
    ``database_url``. Subclasses give it their ``<SERVICE>_MIGRATION_DATABASE_URL`` alias."""
    host: str = "127.0.0.1"
    port: int
