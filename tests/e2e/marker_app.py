"""A Starlette app with two async endpoints doing uniquely named work (concurrency e2e)."""

from __future__ import annotations

import asyncio
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from demo_app.telemetry import configure_tracing
from otelprof_middleware import ProfilingMiddleware

configure_tracing("otelprof-e2e-markers")


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sum(range(50))


def marker_alpha_work() -> None:
    _spin(0.01)


def marker_beta_work() -> None:
    _spin(0.01)


async def alpha(request: Request) -> JSONResponse:
    await asyncio.sleep(0.005)
    marker_alpha_work()
    await asyncio.sleep(0.005)
    marker_alpha_work()
    return JSONResponse({"endpoint": "alpha"})


async def beta(request: Request) -> JSONResponse:
    await asyncio.sleep(0.005)
    marker_beta_work()
    await asyncio.sleep(0.005)
    marker_beta_work()
    return JSONResponse({"endpoint": "beta"})


app = ProfilingMiddleware(
    Starlette(routes=[Route("/alpha", alpha), Route("/beta", beta)]),
    sample_rate=1.0,
    debug_route=True,
    max_concurrent=64,
)
