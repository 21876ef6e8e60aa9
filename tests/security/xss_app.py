"""A hostile app for the browser tests: ``uvicorn tests.security.xss_app:app``.

Its MemoryStore starts filled with real pyinstrument profiles of functions whose names,
file names, target descriptions and routes (and one method) are HTML/JS payloads.
Its one route has a template made of payloads too, so a live request through the real
middleware stores a hostile route template and frame names as well.
"""

from __future__ import annotations

import time

from opentelemetry.sdk.trace import TracerProvider
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from otelprof_middleware import ProfilingMiddleware
from otelprof_middleware._record import ProfileRecord
from otelprof_middleware.stores import MemoryStore

from ..helpers import make_summary
from ._support import (
    HOSTILE_ROUTE,
    LIVE_FUNCTION,
    PAYLOADS,
    STORED,
    hostile_function,
    hostile_session,
)

__all__ = ["app"]


def _filled_store() -> MemoryStore:
    store = MemoryStore()
    for n, (trace_id, span_id, method, route, name, filename, description) in enumerate(STORED):
        session = hostile_session(name, f"/srv/{filename}.py", description, seconds=0.02)
        summary = make_summary(
            n, trace_id=trace_id, span_id=span_id, method=method, route=route, duration_ms=20.0 + n
        )
        store.put(ProfileRecord.from_session(summary, session))
    return store


_work = hostile_function(LIVE_FUNCTION, f"/srv/{PAYLOADS[1]}/live.py")


async def _hostile(request: Request) -> PlainTextResponse:
    _work(time.perf_counter() + 0.03)
    return PlainTextResponse("ok")


app = ProfilingMiddleware(
    Starlette(routes=[Route(HOSTILE_ROUTE, _hostile)]),
    tracer_provider=TracerProvider(),
    profile_store=_filled_store(),
    sample_rate=1.0,
    min_duration_ms=0,
    debug_route=True,
)
