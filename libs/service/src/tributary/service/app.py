"""The app factory: a FastAPI app whose lifespan builds engine, bus and consumers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client.registry import Collector
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from tributary.messaging.bus import Bus, Handlers
from tributary.messaging.db import create_engine, session_factory
from tributary.messaging.errors import InfrastructureError
from tributary.messaging.faults import brief, database_failure
from tributary.messaging.settings import MessagingSettings
from tributary.messaging.uow import UnitOfWork
from tributary.observability.metrics import ServiceMetrics
from tributary.observability.tracing import instrument_app, instrument_engine, setup_tracing
from tributary.service import limits, migrations, problems
from tributary.service.auth import AuthSettings, JwksClient, KeySource, Verifier, public
from tributary.service.correlation import CorrelationMiddleware
from tributary.service.settings import ServiceSettings

log = logging.getLogger("tributary.service")

Startup = Callable[[AsyncExitStack, FastAPI], Awaitable[None]]


@dataclass
class ServiceSpec:
    """What a service is made of; ``create_app`` turns it into a running FastAPI app."""

    name: str
    settings: ServiceSettings
    migrations: Path | None
    """Alembic script directory; None creates every SQLModel table directly (prototypes, tests)."""
    routers: Sequence[APIRouter] = ()
    handlers: Handlers = field(default_factory=dict)
    commands: Handlers = field(default_factory=dict)
    messaging: MessagingSettings | None = None
    startup: Startup | None = None
    """Extra resources (SMTP clients...) entered on the lifespan's exit stack."""
    description: str = ""
    key_source: Callable[[FastAPI], KeySource] | None = None
    """Where token signing keys come from, built once the engine exists; None: identity's JWKS."""
    collectors: Sequence[Collector] = ()
    """The service's own Prometheus metrics, served by ``GET /metrics`` with the runtime's."""


async def _start_bus(bus: Bus) -> None:
    """Wait for the broker at start-up (compose starts us together), then start."""
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(OSError),
        wait=wait_exponential(multiplier=0.5, max=5),
        stop=stop_after_delay(60),
        reraise=True,
    ):
        with attempt:
            await bus.start()


def create_app(spec: ServiceSpec) -> FastAPI:
    setup_tracing(spec.name)
    metrics = ServiceMetrics(spec.name)
    for collector in spec.collectors:
        metrics.registry.register(collector)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            stack.push_async_callback(limits.close, app)
            if spec.migrations is not None:
                owner_url = spec.settings.migration_database_url or spec.settings.database_url
                await migrations.upgrade(spec.migrations, owner_url)
            engine = create_engine(spec.settings.database_url)
            if spec.migrations is None:
                async with engine.begin() as conn:
                    await conn.run_sync(SQLModel.metadata.create_all)
            instrument_engine(engine)
            stack.push_async_callback(engine.dispose)
            app.state.engine = engine
            app.state.sessions = session_factory(engine)
            auth_settings = AuthSettings()
            if spec.key_source is not None:
                source = spec.key_source(app)
            else:  # fetched on the first request that needs it: start-up never waits for identity
                jwks = JwksClient(auth_settings.jwks_url)
                stack.push_async_callback(jwks.aclose)
                source = jwks
            app.state.auth = Verifier(source, auth_settings)
            if spec.startup is not None:
                await spec.startup(stack, app)
            bus = Bus(
                spec.name,
                engine,
                handlers=spec.handlers,
                commands=spec.commands,
                settings=spec.messaging or MessagingSettings(),
            )
            app.state.bus = bus
            bus.listeners.append(metrics.record)
            await _start_bus(bus)
            stack.push_async_callback(bus.stop)
            log.info("%s ready", spec.name)
            yield

    app = FastAPI(
        title=f"Tributary {spec.name}",
        description=spec.description,
        version="0.1.0",
        lifespan=lifespan,
    )
    for kind in (OSError, SQLAlchemyError, InfrastructureError):
        app.add_exception_handler(kind, _unavailable)
    limits.install(app)  # innermost middleware: a body over the limit is refused unread
    problems.install(app)  # every error as problem details, inside the correlation id
    app.add_middleware(CorrelationMiddleware)
    instrument_app(app)  # outermost: the server span covers the correlation middleware
    app.include_router(health_router())
    app.include_router(metrics.router(), dependencies=[public()])
    app.state.metrics = metrics  # a service may register collectors of its own
    for router in spec.routers:
        app.include_router(router)
    return app


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    """A request that failed because the database (or broker) is down: 503 with Retry-After.

    Anything else is a bug: re-raised, so it stays a 500 with its traceback in the log.
    """
    if not (isinstance(exc, InfrastructureError) or database_failure(exc, connecting=True)):
        raise exc
    log.warning("dependency unavailable on %s %s: %s", request.method, request.url.path, brief(exc))
    return problems.unavailable(
        "The service's database or broker is unavailable; retry later.", retry_after=5
    ).response()


def health_router() -> APIRouter:
    router = APIRouter(tags=["health"], dependencies=[public()])

    @router.get("/health/live")
    async def live() -> dict[str, str]:
        """The process answers."""
        return {"status": "ok"}

    @router.get("/health/ready", response_model=None)
    async def ready(request: Request) -> JSONResponse:
        """Database writable, broker connected and not blocking us, relay and consumers working.

        503 with a reason per failed check: an outage that paused consumption shows here.
        """
        checks: dict[str, bool] = {"database": False, "broker": False, "consumers": False}
        reasons: dict[str, str] = {}
        engine: AsyncEngine | None = getattr(request.app.state, "engine", None)
        bus: Bus | None = getattr(request.app.state, "bus", None)
        if engine is not None:
            try:
                async with asyncio.timeout(5):
                    async with engine.connect() as conn:
                        await conn.execute(text("SELECT 1"))
                checks["database"] = True
            except Exception as exc:
                reasons["database"] = brief(exc)
                log.warning("readiness: database: %s", type(exc).__name__)
        else:
            reasons["database"] = "starting"
        if bus is not None:
            for name, (ok, reason) in (await bus.health()).items():
                checks[name] = ok
                if reason:
                    reasons[name] = reason
        else:
            reasons["broker"] = "starting"
        ok = all(checks.values())
        body: dict[str, Any] = {"status": "ready" if ok else "not ready", "checks": checks}
        if reasons:
            body["reasons"] = reasons
        return JSONResponse(body, status_code=200 if ok else 503)

    return router


# -- dependencies for routes -----------------------------------------------------------------


async def get_bus(request: Request) -> Bus:
    """Async on purpose: a sync dependency would hop to the thread pool on every request."""
    bus: Bus = request.app.state.bus
    return bus


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """A read session (writes go through a unit of work)."""
    async with request.app.state.sessions() as session:
        yield session


async def get_uow(bus: Annotated[Bus, Depends(get_bus)]) -> AsyncIterator[UnitOfWork]:
    async with bus.unit_of_work() as uow:
        yield uow


SessionDep = Annotated[AsyncSession, Depends(get_session)]
UowDep = Annotated[UnitOfWork, Depends(get_uow)]
BusDep = Annotated[Bus, Depends(get_bus)]
