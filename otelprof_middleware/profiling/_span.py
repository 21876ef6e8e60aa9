"""Everything about the OTel span: which one we join, and the attribute names we set.

Attribute names live here and nowhere else; docs/attributes.md explains the choice.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.trace import SpanContext, SpanKind
from opentelemetry.trace import propagation as trace_propagation
from opentelemetry.util.http import ExcludeList, parse_excluded_urls

from .._config import DEBUG_PREFIX

__all__ = [
    "BASELINE_URL",
    "PROFILE_ID",
    "PROFILE_URL",
    "PYROSCOPE_PROFILE_ID",
    "ROUTE_KEY",
    "MountedOwners",
    "current_server_span",
    "diff_url",
    "mounted_span_owners",
    "name_by_route",
    "otel_excluded_urls",
    "profile_url",
    "redact_viewer_token",
    "route_attribute",
    "set_profile_attributes",
    "span_declined",
    "span_owner_below",
]

PROFILE_ID = "otelprof.profile.id"
"""``<trace_id>-<span_id>``: the stored profile's key."""

PROFILE_URL = "otelprof.profile.url"
"""Absolute URL of the profile page; Grafana shows it in the span's attributes."""

PYROSCOPE_PROFILE_ID = "pyroscope.profile.id"
"""The span id, set only while the Pyroscope export is on: Grafana's "traces to
profiles" reads it and asks Pyroscope for the samples labelled ``span_id=<it>``."""

ROUTE_KEY = "otelprof.route"
"""ASGI scope / WSGI environ key where a framework integration leaves the route template
(``otelprof_middleware.django.RouteMiddleware``); the adapters read it."""

BASELINE_URL = "otelprof.profile.baseline_url"
"""Absolute URL of this request compared with the recent requests of its route."""


def current_server_span() -> tuple[trace.Span, SpanContext] | None:
    """The span to join, with its context: the current span when it was started in this
    process. (The context goes to the engine with it: it is read once a request.)

    Every instrumentation that runs before us (FastAPI's own telemetry,
    FastAPIInstrumentor, OpenTelemetryMiddleware outside ours) makes its server span
    current, so at our entry it is ``get_current_span()``. A remote parent (a
    ``NonRecordingSpan`` built from headers) or no span means nobody opened the server
    span yet; the adapters then open one through the OTel middleware. FlaskInstrumentor
    starts its span later, in ``before_request``: the WSGI adapter joins it from there
    (``otelprof_middleware._inner_join``).

    A local span that is not a request's (neither SERVER nor carrying an HTTP method)
    was current before the request came: a span around the whole server, such as the
    click instrumentation's span for the ``granian`` command under
    ``opentelemetry-instrument``, or a ``serve`` CLI command's span around
    ``uvicorn.run``. Every request would join that one span, so it counts as none.
    """
    span = _read_current_span()
    context = span.get_span_context()
    if not context.is_valid or context.is_remote or not _is_request_span(span):
        return None
    return span, context


_HTTP_METHOD_KEYS = ("http.request.method", "http.method")


def _is_request_span(span: trace.Span) -> bool:
    """True for an SDK span of kind SERVER, or of another kind with an HTTP method
    attribute (OTel's ASGI/WSGI middleware opens an INTERNAL span when a local span is
    already current: still the request's own); True when the kind cannot be read."""
    kind = getattr(span, "kind", None)
    if kind is None or kind is SpanKind.SERVER:
        return True
    attributes = getattr(span, "attributes", None)
    if not isinstance(attributes, Mapping):
        return True
    return any(key in attributes for key in _HTTP_METHOD_KEYS)


def otel_excluded_urls(protocol: str) -> ExcludeList | None:
    """The URLs OTel's instrumentations leave out, for the span an adapter opens itself:
    ``OTEL_PYTHON_<protocol>_EXCLUDED_URLS``, or else ``OTEL_PYTHON_EXCLUDED_URLS``, read
    as ``opentelemetry.util.http.get_excluded_urls`` reads them (comma-separated regular
    expressions searched in the full URL); None when neither is set."""
    raw = os.environ.get(
        f"OTEL_PYTHON_{protocol}_EXCLUDED_URLS", os.environ.get("OTEL_PYTHON_EXCLUDED_URLS", "")
    )
    return parse_excluded_urls(raw) if raw.strip() else None


def has_ended(span: trace.Span) -> bool:
    """Whether ``span`` (an SDK span) has ended: current at a request's start, it is left
    over from an earlier request, not a server span to join.

    On an asyncio loop, uvicorn resumes reading a connection from inside the request
    that paused it (a large body), and the next requests on that connection inherit
    that request's context, its ended server span current (CPython gh-140947).
    """
    return getattr(span, "end_time", None) is not None


def _span_slot() -> tuple[object, ContextVar[Mapping[str, object]], str] | None:
    """Where the OTel API keeps the current span, when it is where it usually is.

    ``trace.get_current_span()`` is five Python calls (one of them an ABC instance check)
    to read one entry of the dict in one contextvar, on every request. That contextvar
    and that key are private to the API: taken only from its own contextvars runtime
    (the default), checked here once, and used only while that runtime is still the
    current one; anything else reads the span through the API.
    """
    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    variable = getattr(runtime, "_current_context", None)
    key = getattr(trace_propagation, "_SPAN_KEY", None)
    if type(runtime) is not ContextVarsRuntimeContext or not isinstance(key, str):
        return None
    if not isinstance(variable, ContextVar):
        return None
    return runtime, variable, key


_SLOT = _span_slot()
_SPAN_TYPES: set[type] = set()  # Span subclasses already seen there (the SDK's)


def _read_current_span() -> trace.Span:
    """``trace.get_current_span()``, read straight from its contextvar when possible."""
    if _SLOT is not None:
        runtime, variable, key = _SLOT
        if otel_context._RUNTIME_CONTEXT is runtime:
            span = variable.get().get(key)
            if type(span) in _SPAN_TYPES:
                return span  # type: ignore[return-value]
    span = trace.get_current_span()
    if _SLOT is not None and isinstance(span, trace.Span):
        _SPAN_TYPES.add(type(span))  # (the API found it a Span: the type can be trusted)
    return span


_OWNER_CLASSES = frozenset(
    {
        # opentelemetry-instrumentation-asgi (also what FastAPIInstrumentor adds)
        ("opentelemetry.instrumentation.asgi", "OpenTelemetryMiddleware"),
        # Starlette's own (1.10+): SERVER span named by route, ``excluded_urls``
        ("starlette.middleware.opentelemetry", "OpenTelemetryMiddleware"),
    }
)


def _fastapi_traces(app: object) -> bool:
    """True for a FastAPI app whose native telemetry opens server spans."""
    native = getattr(app, "_native_telemetry", None)
    config = getattr(native, "config", None)
    if not isinstance(config, Mapping) or not config.get("tracing"):
        return False
    try:
        return bool(native.enabled())  # type: ignore[union-attr]
    except Exception:
        return False


def _fastapi_tracing_off(app: object) -> bool:
    config = getattr(getattr(app, "_native_telemetry", None), "config", None)
    return isinstance(config, Mapping) and config.get("tracing") is False


def span_owner_below(app: object) -> tuple[object, str | None] | None:
    """The layer below ``app`` that opens the request's server span, if there is one.

    Returns the layer and the name of its attribute that holds the app it calls (where a
    middleware outside it can put a joiner), or None. The attribute is None for a layer
    configured to open no server span (FastAPI with ``telemetry={"tracing": False}``).
    Walks the ``app`` chain, and each Starlette application's middleware stack (built
    now if it is not yet: Starlette builds it at its first request, which is this one).
    Recognised owners: OTel's ASGI middleware (and FastAPIInstrumentor's, the one
    Litestar's ``OpenTelemetryPlugin`` puts in the app's ``asgi_handler``, and one put on a
    Quart app's ``asgi_app``), Starlette's
    own ``OpenTelemetryMiddleware``, a FastAPI app whose native telemetry traces.
    """
    seen: set[int] = set()
    layer: object | None = app
    while layer is not None and id(layer) not in seen and len(seen) < 64:
        seen.add(id(layer))
        # Litestar's plugin middleware calls OTel's, held apart from the app it bypasses to.
        otel = getattr(layer, "open_telemetry_middleware", None)
        if otel is not None:
            layer = otel
        kind = type(layer)
        if (kind.__module__, kind.__name__) in _OWNER_CLASSES:
            return layer, "app"
        if hasattr(layer, "build_middleware_stack") and hasattr(layer, "middleware_stack"):
            if layer.middleware_stack is None:
                layer.middleware_stack = layer.build_middleware_stack()
            # An OTel middleware in its stack wins: FastAPI's telemetry steps aside for it.
            inner = span_owner_below(layer.middleware_stack)
            if inner is None and _fastapi_traces(layer):
                return layer, "middleware_stack"
            if inner is None and _fastapi_tracing_off(layer):
                return layer, None
            return inner
        # A Litestar app calls its ``asgi_handler``, a Quart app its ``asgi_app`` (where
        # OTel's docs put their middleware): neither has an ``app``.
        layer = (
            getattr(layer, "app", None)
            or getattr(layer, "asgi_handler", None)
            or getattr(layer, "asgi_app", None)
        )
    return None


class MountedOwners:
    """The routes of a router whose mounted apps open their own server spans.

    A Starlette app that mounts a FastAPI app with native telemetry (or one wrapped in
    OTel's ASGI middleware) has a span owner for the requests routed there only: a
    request's way is known once the router has matched it. :meth:`owns` matches it as
    the router will (first full match wins), and says whether the route it lands on
    opens the server span; routes that do not, and unmatched paths, get ours.

    Built once, at the first request, by :func:`mounted_span_owners`.
    """

    __slots__ = ("_full", "routes")

    def __init__(self, routes: list[tuple[Any, MountedOwners | None]], full: object) -> None:
        self.routes = routes  # every route in order; a nested router's owners, or None
        self._full = full

    def owns(self, scope: Mapping[str, Any], owners: set[int]) -> bool:
        """Whether the route ``scope`` lands on has a server span owner (in ``owners``)."""
        for route, nested in self.routes:
            match, child_scope = route.matches(scope)
            if match == self._full:
                if id(route) in owners:
                    return True
                return nested is not None and nested.owns({**scope, **child_scope}, owners)
        return False


def mounted_span_owners(
    app: object,
) -> tuple[MountedOwners, dict[int, tuple[object, str | None]]] | None:
    """The router below ``app`` (through its layers) and the span owners mounted in it.

    Returns the routing (see :class:`MountedOwners`) and, by ``id`` of each route whose
    app contains a span owner, that owner as :func:`span_owner_below` gives it; None
    when no mounted app owns spans. Nested routers (a plain Starlette app mounted, with
    a FastAPI app mounted in it) are followed.
    """
    router = _router_below(app)
    if router is None:
        return None
    from starlette.routing import Match

    owners: dict[int, tuple[object, str | None]] = {}
    routes: list[tuple[Any, MountedOwners | None]] = []
    for route in getattr(router, "routes", ()):
        if not callable(getattr(route, "matches", None)):
            return None  # not a Starlette router: its routing is unknown
        nested: MountedOwners | None = None
        mounted = getattr(route, "app", None)  # a Route's is its endpoint: no owner
        if mounted is not None:
            found = span_owner_below(mounted)
            if found is not None:
                owners[id(route)] = found
            else:
                inner = mounted_span_owners(mounted)
                if inner is not None:
                    nested = inner[0]
                    owners.update(inner[1])
        routes.append((route, nested))
    if not owners:
        return None
    return MountedOwners(routes, Match.FULL), owners


def _router_below(app: object) -> object | None:
    """The first layer below ``app`` with a list of ``routes`` (Starlette's router)."""
    seen: set[int] = set()
    layer: object | None = app
    while layer is not None and id(layer) not in seen and len(seen) < 64:
        seen.add(id(layer))
        if isinstance(getattr(layer, "routes", None), list) and not hasattr(
            layer, "build_middleware_stack"
        ):
            return layer
        if hasattr(layer, "build_middleware_stack") and hasattr(layer, "middleware_stack"):
            if layer.middleware_stack is None:
                layer.middleware_stack = layer.build_middleware_stack()
            layer = layer.middleware_stack
            continue
        layer = getattr(layer, "app", None)
    return None


def span_declined(scope: Mapping[str, Any]) -> bool:
    """True when a framework's own telemetry handled this request and chose no span.

    Starlette's ``OpenTelemetryMiddleware`` marks the scope and opens no span for its
    ``excluded_urls``; FastAPI's native telemetry marks it for excluded requests, and
    for requests it handles with tracing off (logs or metrics only); a FastAPI app
    configured with ``telemetry={"tracing": False}`` asked for no server spans.
    """
    if scope.get("starlette.opentelemetry") or "fastapi.telemetry" in scope:
        return True
    return _fastapi_tracing_off(scope.get("app"))


def profile_url(base_url: str, trace_id: str, span_id: str) -> str:
    """The absolute link to one profile. Never carries the debug token."""
    return f"{base_url}{DEBUG_PREFIX}/{trace_id}?span_id={span_id}"


def diff_url(base_url: str, trace_id: str, span_id: str) -> str:
    """The absolute link to a request compared with its route's baseline."""
    return f"{base_url}{DEBUG_PREFIX}/{trace_id}/diff?span_id={span_id}"


def set_profile_attributes(
    span: trace.Span, trace_id: str, span_id: str, base_url: str, *, has_route: bool
) -> None:
    """Put the profile id and links on ``span`` (call before the span ends)."""
    attributes = {
        PROFILE_ID: f"{trace_id}-{span_id}",
        PROFILE_URL: profile_url(base_url, trace_id, span_id),
    }
    if has_route:  # an unmatched request has no route, so no baseline
        attributes[BASELINE_URL] = diff_url(base_url, trace_id, span_id)
    span.set_attributes(attributes)


_TOKEN_IN_QUERY = re.compile(r"(^|[?&])token=[^&#]*")
_URL_ATTRIBUTES = ("url.query", "url.full", "http.url", "http.target")


def redact_viewer_token(span: trace.Span) -> None:
    """Blank ``token=`` in the URL attributes an outer instrumentation put on ``span``.

    A browser opens the viewer once with ``?token=...``; an OTel server span opened
    around the middleware has already recorded that URL, and would export the token with
    the trace.
    """
    if not span.is_recording():
        return
    attributes: Mapping[str, Any] | None = getattr(span, "attributes", None)
    for key in _URL_ATTRIBUTES:
        value = attributes.get(key) if attributes else None
        if isinstance(value, str) and "token=" in value:
            span.set_attribute(key, _TOKEN_IN_QUERY.sub(r"\1token=REDACTED", value))


def name_by_route(span: trace.Span, method: str, route: str | None) -> None:
    """Name a server span we opened ``METHOD route`` and set ``http.route`` (semconv).

    Spans are opened before routing, named by the raw path: renamed once the route
    template is known, so span names do not grow with every id in a path. No route
    (nothing matched): the method alone (``HTTP`` for an unknown one), as the HTTP
    semantic conventions name such spans.
    """
    if not span.is_recording():
        return
    if route:
        span.update_name(f"{method} {route}")
        span.set_attribute("http.route", route)
    else:
        span.update_name("HTTP" if method == "_OTHER" else method)


def route_attribute(span: trace.Span) -> str | None:
    """The ``http.route`` an instrumentation already put on ``span``, if readable."""
    attributes: Mapping[str, Any] | None = getattr(span, "attributes", None)
    if attributes is None:
        return None
    # Not ``attributes.get``: the SDK's attributes are a Python ``Mapping``, whose
    # ``get`` is one more Python call around this same ``KeyError`` (raised on most spans
    # we ask: no instrumentation named their route), and a test of their length first
    # is two more. Nor a search of its keys: iterating copies them under a lock.
    try:
        route = attributes["http.route"]
    except KeyError:
        return None
    return route if isinstance(route, str) else None
