"""A FastAPI app with the middleware added with no arguments at all (the defaults e2e)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from demo_app.telemetry import configure_tracing
from otelprof_middleware import ProfilingMiddleware

configure_tracing("otelprof-e2e-defaults")


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sum(range(50))


def slow_marker_work(seconds: float) -> None:
    spin(seconds)


def failing_marker_work(seconds: float) -> None:
    spin(seconds)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.started = True  # the app's own start-up must run whatever our settings say
    yield


app = FastAPI(lifespan=lifespan)


@app.get("/started")
async def started() -> dict[str, bool]:
    return {"started": getattr(app.state, "started", False)}


@app.get("/items/{item_id}")
async def item(item_id: int, slow: bool = False) -> dict[str, int]:
    spin(0.002)
    if slow:
        slow_marker_work(0.3)
    return {"item": item_id}


@app.get("/boom")
async def boom() -> None:
    failing_marker_work(0.03)
    raise RuntimeError("on purpose")


app.add_middleware(ProfilingMiddleware)
