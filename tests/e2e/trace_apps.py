"""Two services of one trace, for the viewer's browser test: ``uvicorn
tests.e2e.trace_apps:app`` with ``TRACE_APPS_SERVICE=checkout`` or ``=pricing``.

``GET /checkout/{n}`` (service ``checkout``) runs ``checkout_marker`` and calls
``GET /price/{n}`` on the pricing service (``TRACE_APPS_PRICING_URL``), passing the trace
on with the W3C ``traceparent`` header; ``?slow=1`` makes ``checkout_marker`` run ten
times longer, so a diff against the route's usual requests shows it slower. Both
services keep every profile in the store ``OTELPROF_STORE`` names (a shared Redis).
"""

from __future__ import annotations

import os

import httpx
from opentelemetry.propagate import inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from otelprof_middleware import ProfilingMiddleware

from ..helpers import spin

__all__ = ["app"]

SERVICE = os.environ.get("TRACE_APPS_SERVICE", "checkout")


def checkout_marker(seconds: float) -> int:
    return spin(seconds)


def pricing_marker(seconds: float) -> int:
    return spin(seconds)


def checkout(request: Request) -> PlainTextResponse:
    checkout_marker(0.08 if request.query_params.get("slow") else 0.008)
    headers: dict[str, str] = {}
    inject(headers)  # the current (server) span's context, as traceparent
    url = os.environ["TRACE_APPS_PRICING_URL"] + f"/price/{request.path_params['n']}"
    price = httpx.get(url, headers=headers, timeout=10).text
    return PlainTextResponse(f"total {price}")


def price(request: Request) -> PlainTextResponse:
    pricing_marker(0.01)
    return PlainTextResponse("42")


routes = [Route("/checkout/{n}", checkout)] if SERVICE == "checkout" else []
routes.append(Route("/price/{n}", price))

app = ProfilingMiddleware(
    Starlette(routes=routes),
    tracer_provider=TracerProvider(resource=Resource.create({"service.name": SERVICE})),
    sample_rate=1.0,
    min_duration_ms=0,
    debug_route=True,
)
