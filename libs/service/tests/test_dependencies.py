"""The runtime's per-request dependencies run on the event loop, never in the thread pool.

FastAPI runs a sync dependency with ``anyio.to_thread.run_sync``: a hop to a worker thread and
back on every request. The probe records every callable handed to the thread pool while a
request is served; a sync dependency of the test's own shows that the probe sees such a hop.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import anyio.to_thread
import httpx
import pytest
from fastapi import Depends, FastAPI, Request
from fastapi.dependencies.models import Dependant

from tributary.messaging.bus import Bus
from tributary.messaging.db import create_engine, session_factory
from tributary.service import limits
from tributary.service.app import BusDep, SessionDep, UowDep, get_bus, get_session, get_uow
from tributary.service.auth import public


def _target(func: Callable[..., Any]) -> Callable[..., Any]:
    """The function behind the partials starlette wraps a sync dependency in."""
    while isinstance(func, functools.partial):
        func = func.func
    return func


@pytest.fixture
def pooled(monkeypatch: pytest.MonkeyPatch) -> list[Callable[..., Any]]:
    """Every callable run in the AnyIO thread pool while the test runs."""
    calls: list[Callable[..., Any]] = []
    original = anyio.to_thread.run_sync

    async def recording(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        calls.append(_target(func))
        return await original(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", recording)
    return calls


def sync_probe(request: Request) -> str:
    """A sync dependency: FastAPI runs it in the thread pool."""
    return request.url.path


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[FastAPI]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'deps.db'}")
    app = FastAPI()
    limits.install(app)
    app.state.sessions = session_factory(engine)
    app.state.bus = Bus("deps", engine)

    @app.get("/runtime", dependencies=[public()])
    async def runtime(bus: BusDep, session: SessionDep, uow: UowDep) -> dict[str, str]:
        return {"service": bus.service}

    @app.get("/sync", dependencies=[public()])
    async def with_sync(path: Annotated[str, Depends(sync_probe)]) -> dict[str, str]:
        return {"path": path}

    try:
        yield app
    finally:
        await engine.dispose()


async def _get(app: FastAPI, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.get(path)


async def test_the_probe_sees_a_sync_dependency_run_in_the_thread_pool(
    app: FastAPI, pooled: list[Callable[..., Any]]
) -> None:
    response = await _get(app, "/sync")
    assert response.json() == {"path": "/sync"}
    assert sync_probe in pooled


async def test_bus_session_and_unit_of_work_are_served_without_the_thread_pool(
    app: FastAPI, pooled: list[Callable[..., Any]]
) -> None:
    response = await _get(app, "/runtime")
    assert response.status_code == 200, response.text
    assert response.json() == {"service": "deps"}
    runtime = {get_bus, get_session, get_uow}
    assert not runtime & set(pooled), f"run in the thread pool: {pooled}"


def _calls(dependant: Dependant) -> Iterator[Any]:
    for sub in dependant.dependencies:
        yield sub.call
        yield from _calls(sub)


def _is_async(call: Any) -> bool:
    if inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call):
        return True
    dunder = getattr(call, "__call__", None)  # noqa: B004 (a class instance: HTTPBearer)
    return not inspect.isroutine(call) and (
        inspect.iscoroutinefunction(dunder) or inspect.isasyncgenfunction(dunder)
    )


def test_every_dependency_the_runtime_offers_routes_is_async() -> None:
    """Walks what a route using every runtime dependency depends on, transitively."""
    from fastapi.routing import APIRoute

    from tributary.service.auth import require
    from tributary.service.limits import rate_limit

    app = FastAPI()

    @app.get(
        "/all/{user_id}",
        dependencies=[
            require("users:read", owner="user_id"),
            rate_limit("deps", per_address="10/minute", per_key="10/minute"),
        ],
    )
    async def everything(user_id: str, bus: BusDep, session: SessionDep, uow: UowDep) -> None:
        return None

    route = next(r for r in app.routes if isinstance(r, APIRoute) and r.path == "/all/{user_id}")
    calls = [call for call in _calls(route.dependant) if call is not None]
    assert {get_bus, get_session, get_uow} <= set(calls)
    sync = [getattr(call, "__name__", repr(call)) for call in calls if not _is_async(call)]
    assert not sync, f"sync per-request dependencies (run in the thread pool): {sync}"
