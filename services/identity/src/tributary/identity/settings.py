from __future__ import annotations

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from tributary.identity.models import looks_like_secret
from tributary.service.settings import ServiceSettings


class Settings(ServiceSettings):
    # no input values in validation errors: they would print the bootstrap secret
    model_config = SettingsConfigDict(**ServiceSettings.model_config, hide_input_in_errors=True)

    database_url: str = Field(
        default="sqlite+aiosqlite:///var/identity.db", validation_alias="IDENTITY_DATABASE_URL"
    )
    port: int = Field(default=8001, validation_alias="IDENTITY_PORT")
    bootstrap_admin_api_key: SecretStr | None = Field(
        default=None, validation_alias="BOOTSTRAP_ADMIN_API_KEY"
    )
    """An API key secret registered at start-up for the built-in owner ``usr_bootstrapadmin``."""

    @field_validator("bootstrap_admin_api_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("bootstrap_admin_api_key")
    @classmethod
    def _an_api_key_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not looks_like_secret(value.get_secret_value()):
            raise ValueError(
                "BOOTSTRAP_ADMIN_API_KEY must look like the secrets identity issues: 'trib_' and "
                '43 base64url characters, e.g. the output of python -c "import secrets; '
                "print('trib_' + secrets.token_urlsafe(32))\""
            )
        return value
