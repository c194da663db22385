from __future__ import annotations

from contextlib import AsyncExitStack
from datetime import timedelta
from pathlib import Path

from fastapi import FastAPI

from tributary.identity import api, api_keys, erasure, oauth, signing
from tributary.identity.bootstrap import register_bootstrap_admin
from tributary.identity.handlers import HANDLERS
from tributary.identity.oauth import TokenIssuer
from tributary.identity.settings import Settings
from tributary.identity.signing import SigningKeys
from tributary.messaging.settings import MessagingSettings
from tributary.service.app import ServiceSpec
from tributary.service.app import create_app as build
from tributary.service.auth import AuthSettings


def signing_keys(app: FastAPI) -> SigningKeys:
    """The signing keys on this lifespan's database (made on first use, shared afterwards).

    Also the app's ``KeySource``: identity verifies its own tokens from its database.
    """
    keys: SigningKeys | None = getattr(app.state, "signing_keys", None)
    if keys is None or keys.sessions is not app.state.sessions:
        auth = AuthSettings()
        # a superseded key stays published until every token it signed has expired
        published_for = timedelta(seconds=auth.token_ttl_seconds + auth.leeway_seconds)
        keys = SigningKeys(app.state.sessions, published_for=published_for)
        app.state.signing_keys = keys
        app.state.tokens = TokenIssuer(keys, auth)
    return keys


def create_app(
    settings: Settings | None = None, messaging: MessagingSettings | None = None
) -> FastAPI:
    settings = settings or Settings()

    async def startup(stack: AsyncExitStack, app: FastAPI) -> None:
        await signing_keys(app).ensure_active()
        if settings.bootstrap_admin_api_key is not None:
            secret = settings.bootstrap_admin_api_key.get_secret_value()
            await register_bootstrap_admin(app.state.sessions, secret)

    return build(
        ServiceSpec(
            name="identity",
            settings=settings,
            migrations=Path(__file__).parent / "migrations",
            routers=[api.router, api_keys.router, erasure.router, oauth.router, signing.router],
            handlers={**HANDLERS, **erasure.HANDLERS},
            messaging=messaging,
            startup=startup,
            key_source=signing_keys,
            description="Users, roles, plans and API keys; issues access tokens "
            "(OAuth 2.0 client credentials) and publishes their signing keys.",
        )
    )
