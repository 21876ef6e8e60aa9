"""A Litestar app (pure ASGI) with an async handler and a ``sync_to_thread`` handler."""

from __future__ import annotations

import asyncio
import time

from litestar import Litestar, get

from demo_app.telemetry import configure_tracing
from otelprof_middleware import ProfilingMiddleware

configure_tracing("otelprof-e2e-litestar")


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sum(range(50))


def marker_litestar_async_work() -> None:
    _spin(0.01)


def marker_litestar_thread_work() -> None:
    _spin(0.01)


@get("/items/{item_id:int}")
async def item(item_id: int) -> dict[str, int]:
    await asyncio.sleep(0.002)
    marker_litestar_async_work()
    return {"item_id": item_id}


@get("/reports/{name:str}", sync_to_thread=True)
def report(name: str) -> dict[str, str]:
    """A blocking handler: Litestar runs it on a worker thread."""
    marker_litestar_thread_work()
    return {"report": name}


@get("/health", sync_to_thread=False)
def health() -> str:
    return "ok"


app = ProfilingMiddleware(
    Litestar(route_handlers=[item, report, health]),
    debug_route=True,
    exclude_paths="/health",
)
