"""Known inputs of the exporter tests (OTLP profiles and Pyroscope): one request's
summary and hand-built session, and an app whose one route does marker work."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.trace import TracerProvider
from pyinstrument.session import Session
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from otelprof_middleware import ProfilingMiddleware
from otelprof_middleware._record import ProfileSummary
from otelprof_middleware.stores import MemoryStore

from .helpers import make_session, make_summary, marker_alpha

LOOPBACK = ("127.0.0.1", 50000)
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"

ROOT = "handle\x00/srv/app/server.py\x0010\x01l12"
VIEW = "get\x00/srv/app/views.py\x0020\x01cItemView\x01l25"
WORK = "crunch\x00/srv/app/work.py\x0030\x01l33"


def exported_summary(span_id: str = SPAN_ID, route: str = "/items/{item_id}") -> ProfileSummary:
    """GET ``route`` of trace TRACE_ID, 50 ms from 1_700_000_000.25."""
    return make_summary(
        trace_id=TRACE_ID,
        span_id=span_id,
        route=route,
        duration_ms=50.0,
        start_time=1_700_000_000.25,
    )


def sample_session() -> Session:
    """Four samples of three stacks over ROOT, VIEW and WORK (35 ms), in a 50 ms request."""
    return make_session(
        [
            ([ROOT, VIEW, WORK], 0.010),
            ([ROOT, VIEW, WORK], 0.002),  # same stack: one sample, summed
            ([ROOT, VIEW], 0.003),
            ([ROOT, VIEW, "[await]"], 0.020),
        ],
        start_time=1_700_000_000.25,
        duration=0.05,
        target_description="test",
        sys_path=["/srv"],
    )


async def item(request: Request) -> JSONResponse:
    marker_alpha(0.02)
    return JSONResponse({"id": request.path_params["item_id"]})


def item_app(provider: TracerProvider, **settings: Any) -> ProfilingMiddleware:
    """``GET /items/{item_id}`` (:func:`item`) behind the middleware, every request kept."""
    return ProfilingMiddleware(
        Starlette(routes=[Route("/items/{item_id}", item)]),
        tracer_provider=provider,
        profile_store=MemoryStore(),
        sample_rate=1.0,
        **settings,
    )
