"""``ProfilingMiddleware``: the ASGI adapter (FastAPI, Starlette, Django's ASGI app)."""

from __future__ import annotations

import copy
import weakref
from collections.abc import Awaitable
from contextvars import ContextVar
from typing import Unpack

import anyio.to_thread
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware, get_host_port_url_tuple
from opentelemetry.trace import SpanContext
from starlette.routing import BaseRoute, Match, Mount

from ._adapter_parts import build_parts
from ._config import Settings
from ._failsafe import log_failure
from ._request import RequestFacts, app_path, normalise_method
from ._route_notes import note_falcon_routes, note_quart_routes
from ._types import ASGIApp, Message, Receive, Scope, Send
from .profiling._active_profile import ActiveProfile
from .profiling._engine import ProfilerCore
from .profiling._request_profile import add_stem_marker
from .profiling._span import (
    ROUTE_KEY,
    MountedOwners,
    current_server_span,
    has_ended,
    mounted_span_owners,
    name_by_route,
    otel_excluded_urls,
    span_declined,
    span_owner_below,
)
from .stores._base import ProfileStore
from .viewer import serve_asgi as serve_viewer

__all__ = ["ProfilingMiddleware", "serve_viewer"]


class ProfilingMiddleware:
    """Profile sampled requests with pyinstrument and link each profile from its span.

    Pure ASGI (no ``BaseHTTPMiddleware``): contextvars, streaming and background tasks
    behave exactly as without it. Websocket and lifespan scopes pass straight through.

    Example::

        from fastapi import FastAPI
        from otelprof_middleware import ProfilingMiddleware

        app = FastAPI()
        app.add_middleware(ProfilingMiddleware)  # the defaults are the production setting

    Args:
        app: the ASGI application to wrap.
        tracer_provider: used when no instrumentation opened a server span; then
            this middleware opens one through opentelemetry-instrumentation-asgi. Its
            resource also names the service of a profile whose span the sampler did not
            record (a triggered request). Default: the global provider.
        profile_store: a store instance (tests, custom backends) instead of the
            ``store`` URL.
        **settings: every :class:`~otelprof_middleware.Config` field, e.g.
            ``sample_rate=0.1`` (also read from ``OTELPROF_*`` environment variables;
            an explicit argument wins).

    An invalid setting or ``OTELPROF_*`` variable (or store URL) turns profiling off for
    this app and is logged as an error naming it; requests pass straight through.
    """

    def __init__(
        self,
        app: ASGIApp,
        /,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        profile_store: ProfileStore | None = None,
        **settings: Unpack[Settings],
    ) -> None:
        self.app = app
        parts = build_parts(settings, profile_store, tracer_provider)
        self.config, self._core, self._viewer = parts.config, parts.core, parts.viewer
        self._start_policy = self._core.start_policy
        self._trigger_header = self._start_policy.trigger_header
        self._traced_app = OpenTelemetryMiddleware(
            self._in_own_span, tracer_provider=tracer_provider, exclude_spans=["receive", "send"]
        )
        self._otel_excluded = otel_excluded_urls("ASGI")
        self._owner_checked = False
        self._joins_below_owner = False
        self._is_joiner = False
        # Span owners in mounted apps, by id of their route (found at the first request).
        self._mounted: MountedOwners | None = None
        self._mounted_owners: set[int] = set()
        # (middleware stack, whether OTel's ASGI middleware runs above us in it)
        self._otel_above: tuple[object, bool] | None = None
        if self.config.enabled:
            note_quart_routes(app)
            note_falcon_routes(app)

    @property
    def core(self) -> ProfilerCore:
        """The framework-agnostic core (store, writer, counters), for tests and tools."""
        return self._core

    async def __call__(
        self, scope: Scope, receive: Receive, send: Send, *, _in_own_span: bool = False
    ) -> None:
        # One coroutine for the whole profiled path: every await of the request resumes
        # through each coroutine level between the server and the app.
        if _in_own_span:  # called back by the OTel middleware, under the span it opened
            span = trace.get_current_span()
            context = span.get_span_context()
        elif self._is_joiner:  # below the layer that owns the server span: join or pass
            joined = current_server_span() if scope["type"] == "http" else None
            if joined is None or _excluded.get():
                await self.app(scope, receive, send)
                return
            span, context = joined
        else:
            if scope["type"] != "http":
                if scope["type"] == "lifespan" and self.config.enabled:
                    send = _DrainingAtShutdown(send, self._core)
                await self.app(scope, receive, send)
                return
            way: tuple[trace.Span, SpanContext] | object = _PASS
            try:
                way = self._way(scope)
            except Exception as exc:  # never the app's: it has not been called yet
                log_failure("adapter", exc)
            if way is _PASS:
                await self.app(scope, receive, send)
                return
            if way is _EXCLUDED:  # (said to our joiners inside, if any)
                token = _excluded.set(True)
                try:
                    await self.app(scope, receive, send)
                finally:
                    _excluded.reset(token)
                return
            if way is _LEFTOVER:  # an earlier request's context: this one starts afresh
                fresh = otel_context.attach(otel_context.Context())
                try:
                    await self(scope, receive, send)
                finally:
                    otel_context.detach(fresh)
                return
            if way is _VIEWER:
                assert self._viewer is not None
                await serve_viewer(self._viewer, scope, send)
                return
            if way is _OPEN_SPAN:
                try:
                    await self._traced_app(scope, receive, send)
                except Exception as exc:
                    if _app_called.get() is scope:
                        # The app's, its server's, or OTel's once the app ran (a span
                        # processor raising as the span ends): untouched, never a 2nd call.
                        raise
                    # OTel's middleware failed before the app ran (it decodes the query
                    # string as strict UTF-8, say): the app answers, with no span of ours.
                    log_failure("span", exc)
                    await self.app(scope, receive, send)
                return
            span, context = way  # type: ignore[misc]  # the server span to join
        send_profiled: _ProfiledSend | None = None
        active: ActiveProfile | None = None
        try:
            active = self._core.start(span, context, self._describe(scope))
            if active is not None:
                send_profiled = _ProfiledSend(self._core, active, scope, send)
        except Exception as exc:
            log_failure("profiler.start", exc)
        if send_profiled is None or active is None:
            await self.app(scope, receive, send)
            return
        try:
            await self._core.confine(active, self.app(scope, receive, send_profiled))
        except Exception:
            send_profiled.failed = True
            raise
        finally:
            send_profiled.finish()

    def _way(self, scope: Scope) -> tuple[trace.Span, SpanContext] | object:
        """The viewer, straight through, the server span to join (with its context), one
        to open, or an ended span left current by an earlier request (start afresh)."""
        path = app_path(scope)
        if self._viewer is not None and self._viewer.handles(path):
            return _VIEWER
        if self._start_policy.is_excluded(path):
            return _EXCLUDED
        joined = current_server_span()
        if joined is not None:
            return _LEFTOVER if has_ended(joined[0]) else joined
        if self._joins_below_owner or span_declined(scope) or self._declined_above(scope):
            return _PASS  # a layer inside us owns the span (our joiner is there), or none
        if not self._owner_checked:
            self._owner_checked = True
            if self._join_below_owner():
                return _PASS
        if self._mounted is not None and self._mounted.owns(scope, self._mounted_owners):
            return _PASS  # routed to a mounted app that owns the span (joiner inside)
        excluded = self._otel_excluded
        if excluded is not None:  # the URL as OTel's ASGI middleware matches it
            url: str = get_host_port_url_tuple(scope)[2]  # type: ignore[no-untyped-call]
            if excluded.url_disabled(url):
                return _EXCLUDED  # as OTel's instrumentations leave it out: no span
        return _OPEN_SPAN

    def _declined_above(self, scope: Scope) -> bool:
        """True when OTel's ASGI middleware runs above this one in the Starlette app
        serving the request, and opened no server span: it declined this request (its
        ``excluded_urls``), so we open none either. That is FastAPIInstrumentor's layer
        (``instrument_app``, or ``opentelemetry-instrument``), which wraps the app's whole
        middleware stack, ours included; unlike Starlette's and FastAPI's own telemetry it
        does not mark the scope. Found once per middleware stack, by walking it down to
        this middleware."""
        stack = getattr(scope.get("app"), "middleware_stack", None)
        if stack is None:
            return False
        known = self._otel_above
        if known is not None and known[0] is stack:
            return known[1]
        above = False
        try:
            above = _otel_asgi_above(stack, self)
        except Exception as exc:
            log_failure("adapter", exc)
        self._otel_above = (stack, above)
        return above

    def _join_below_owner(self) -> bool:
        """Put a joining copy of this middleware right below the layer that owns spans.

        There must be one server span per request, the one the user configured: when
        the app we wrap contains OTel's ASGI middleware, Starlette's or FastAPI's own
        telemetry, that layer opens it (with its own exclusions and names), and the
        request is profiled from just inside it, by a copy of this middleware that only
        joins. Runs once, at the first request.
        """
        found = span_owner_below(self.app)
        if found is None:
            self._join_mounted_owners()
            return False
        self._joins_below_owner = True
        self._put_joiner(*found)
        return True

    def _join_mounted_owners(self) -> None:
        """As :meth:`_join_below_owner`, for apps mounted in the router below that own
        spans: a joiner in each, and :attr:`_mounted` to tell their requests apart."""
        found = mounted_span_owners(self.app)
        if found is None:
            return
        self._mounted, owners = found
        self._mounted_owners = set(owners)
        for owner, attribute in owners.values():
            self._put_joiner(owner, attribute)

    def _put_joiner(self, owner: object, attribute: str | None) -> None:
        """A joining copy of this middleware in ``owner.<attribute>`` (None: the owner
        asked for no server spans, so none of ours either)."""
        if attribute is None:
            return
        joiner = copy.copy(self)
        joiner.app = getattr(owner, attribute)
        joiner._viewer = None  # the viewer is served here, outside
        joiner._is_joiner = True
        joiner._mounted = None
        setattr(owner, attribute, joiner)

    async def _in_own_span(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app, under the server span this middleware had the OTel middleware open."""
        _app_called.set(scope)  # (the same context as our caller's: OTel awaits us inline)
        naming = _NamingSend(send, scope, trace.get_current_span())
        try:
            await self(scope, receive, naming, _in_own_span=True)
        finally:
            if not naming.named:  # no last body came through us (see _NamingSend)
                naming.name_span()

    def _describe(self, scope: Scope) -> RequestFacts:
        """The request as the engine sees it (its headers are read only if need be)."""
        trigger: bytes | None = None
        headers = scope.get("headers", ())
        if self._start_policy.triggers_allowed:
            for name, value in headers:
                if name == self._trigger_header:
                    trigger = bytes(value)
                    break
        method: str = scope["method"]
        scheme: str = scope.get("scheme", "http")
        host = None  # in ``headers``, looked for only if a link is made
        server = scope.get("server")
        # The middleware's own mount point: a Mount inside the app rewrites the scope's.
        root_path: str = scope.get("root_path", "")
        client = scope.get("client")
        client_host = client[0] if client else None
        # In the fields' order: a class called with keywords builds a dict of them.
        return RequestFacts(method, scheme, host, headers, server, root_path, client_host, trigger)


add_stem_marker(ProfilingMiddleware.__call__.__code__)

_PASS, _EXCLUDED, _VIEWER, _OPEN_SPAN, _LEFTOVER = (object() for _ in range(5))

_excluded: ContextVar[bool] = ContextVar("otelprof_excluded", default=False)
"""True while the app serves a request that ``exclude_paths`` leaves out: the joining
copies of the middleware inside the app (below the layer that owns the span) see the
path only as a mount inside has rewritten it, so the outer middleware decides."""

_app_called: ContextVar[Scope | None] = ContextVar("otelprof_app_called", default=None)
"""The scope of the last request whose app the OTel middleware called under our span: an
exception it raises after that (its ``finally`` ends the span) must not call it again."""


def _otel_asgi_above(stack: object, target: object) -> bool:
    """Whether an OTel ``OpenTelemetryMiddleware`` is on the way from ``stack`` (a
    Starlette app's middleware stack) down to ``target``, following each layer's ``app``."""
    layer: object | None = stack
    seen_otel = False
    for _ in range(64):
        if layer is None:
            return False
        if layer is target:
            return seen_otel
        if isinstance(layer, OpenTelemetryMiddleware):
            seen_otel = True
        layer = getattr(layer, "app", None)
    return False


def _is_last(message: Message) -> bool:
    """The response's last message: the server span ends right after it."""
    kind = message["type"]
    return (
        kind == "http.response.body" and not message.get("more_body", False)
    ) or kind == "http.response.pathsend"


def route_template(scope: Scope, *, for_span: bool = False, root_path: str = "") -> str | None:
    """The matched route template: Starlette/FastAPI (before Starlette 1.0, found from
    the matched endpoint), Litestar, Django (RouteMiddleware), Quart (noted by
    :func:`~._route_notes.note_quart_routes`).

    None: unknown here (the span's ``http.route`` may tell); ``""``: known to be none.

    ``for_span``: Starlette's ``path_format`` (``/items/{item_id}``) under the mount's
    ``root_path``, as Starlette's own telemetry names spans; else the route's ``path``
    (``/items/{item_id:int}``), as the profile index shows it, below ``root_path`` (the
    one the middleware was called with): a Starlette ``Mount`` inside the middleware's
    app adds its own prefix to ``scope["root_path"]``, and that part is shown.
    """
    route = scope.get("route")
    if route is None and "endpoint" in scope:
        route = _starlette_0x_route(scope)
    if route is not None:
        # A Mount when the mounted app set no route of its own (its ``root_path`` already
        # ends with the mount's path): the mount point, as Starlette's telemetry names it.
        mounted = isinstance(route, Mount)
        template = "" if mounted else getattr(route, "path_format" if for_span else "path", None)
        if isinstance(template, str) and (template or mounted):
            mounted_at: str = scope.get("root_path", "")
            if not for_span and root_path and mounted_at.startswith(root_path):
                mounted_at = mounted_at[len(root_path) :]
            return mounted_at.rstrip("/") + template or "/"
    for key in ("path_template", ROUTE_KEY):  # Litestar; Django through RouteMiddleware
        template = scope.get(key)
        if isinstance(template, str) and template:
            return template
    if "litestar_app" in scope:
        # Litestar routed it and matched nothing: no route, whatever its OTel plugin put
        # in ``http.route`` (the method and the raw path, one value per scanned path).
        return ""
    return None


def _starlette_0x_route(scope: Scope) -> object | None:
    """The route Starlette before 1.0 matched: its router puts only the route's
    ``endpoint`` in the scope (a Mount's: its app), not the route.

    Looked up among the outermost router's routes, into mounted apps (indexed by
    endpoint at a router's first request, and again when an endpoint is not in the
    index); of several routes with that endpoint, the one matching the scope (whose
    ``root_path`` is the innermost mount's by now, as those routes' own matching expects).
    """
    endpoint = scope["endpoint"]
    router = scope.get("router")
    if router is None:
        return None
    known = _ENDPOINT_ROUTES.get(id(router))
    found = known[1].get(id(endpoint)) if known is not None and known[0]() is router else None
    if found is None:  # the router's first request, or a route added since
        index: dict[int, list[BaseRoute]] = {}
        _index_routes(getattr(router, "routes", ()), index, 8)
        if len(_ENDPOINT_ROUTES) >= 64:  # (routers come and go in test suites)
            _ENDPOINT_ROUTES.clear()
        _ENDPOINT_ROUTES[id(router)] = (weakref.ref(router), index)
        found = index.get(id(endpoint), [])
    if len(found) > 1:
        found = [route for route in found if route.matches(scope)[0] is not Match.NONE]
    return found[0] if found else None


def _index_routes(routes: object, index: dict[int, list[BaseRoute]], depth: int) -> None:
    """``routes`` (and those of mounts in it, ``depth`` deep) by the id of their
    ``endpoint`` (a Mount: its app), into ``index`` (whose routes keep the ids valid)."""
    if not isinstance(routes, list):
        return
    for route in routes:
        if isinstance(route, Mount):
            index.setdefault(id(route.app), []).append(route)
            if depth:
                _index_routes(route.routes, index, depth - 1)
        elif isinstance(route, BaseRoute):
            endpoint = getattr(route, "endpoint", None)
            if endpoint is not None:
                index.setdefault(id(endpoint), []).append(route)


_ENDPOINT_ROUTES: dict[int, tuple[weakref.ref[object], dict[int, list[BaseRoute]]]] = {}
"""Starlette 0.x routers (by id, with a reference to tell a new one at the same id) ->
their routes by endpoint id (see :func:`_starlette_0x_route`). Starlette's ``Router``
compares by value: it cannot be a dict key."""


class _NamingSend:
    """``send`` of a request under a span we opened: names it by route before it ends.

    The span ends right after the last body; a request whose last body never comes
    through here (the app raised and an outer ``ServerErrorMiddleware`` answers, or a
    stream returned mid-body as its client left) is named when the app returns.
    """

    __slots__ = ("_scope", "_send", "_span", "named")

    def __init__(self, send: Send, scope: Scope, span: trace.Span) -> None:
        self._send = send
        self._scope = scope
        self._span = span
        self.named = False

    def __call__(self, message: Message) -> Awaitable[None]:
        try:
            if _is_last(message):
                self.name_span()
        except Exception as exc:  # a malformed message: the server answers it
            log_failure("span", exc)
        return self._send(message)

    def name_span(self) -> None:
        """Name the span by the route matched so far (never raises)."""
        self.named = True
        try:
            scope = self._scope
            method = normalise_method(scope.get("method", ""))
            name_by_route(self._span, method, route_template(scope, for_span=True))
        except Exception as exc:
            log_failure("span", exc)


class _DrainingAtShutdown:
    """The lifespan's ``send``: before the app reports its shutdown done, the always-on
    timer is stopped (:meth:`ProfilerCore.stand_down`), and what the writer and the
    exporter hold is written and sent.

    uvicorn re-raises the SIGTERM it caught once it has shut down, so the process ends
    without running ``atexit`` (where the writer otherwise gets its last flush): the
    profiles of the last requests would be lost.
    """

    __slots__ = ("_core", "_send")

    def __init__(self, send: Send, core: ProfilerCore) -> None:
        self._send = send
        self._core = core

    async def __call__(self, message: Message) -> None:
        if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
            self._core.stand_down()
            try:
                await anyio.to_thread.run_sync(self._core.drain)
            except Exception as exc:
                log_failure("writer.drain", exc)
        await self._send(message)


class _ProfiledSend:
    """The app's ``send``: notes the status and finishes the profile before the last body.

    A plain callable returning ``send``'s own awaitable, not a coroutine function: no
    coroutine (and no level in the await chain) per message, no closure per request.
    Nothing of ours here may raise: failures are counted and logged, and the message
    goes on to the server as the app sent it.
    """

    __slots__ = ("_active", "_core", "_scope", "_send", "failed", "status_code")

    def __init__(self, core: ProfilerCore, active: ActiveProfile, scope: Scope, send: Send) -> None:
        self._core = core
        self._active = active
        self._scope = scope
        self._send = send
        self.failed = False  # the app raised
        self.status_code = 500  # until the app sends http.response.start

    def __call__(self, message: Message) -> Awaitable[None]:
        try:
            if message["type"] == "http.response.start":
                self.status_code = message["status"]
                self._core.response_sent_here(self._active)  # from a task of its own?
            elif _is_last(message):  # the server span ends right after it: link it first
                self._stop_and_keep()
        except Exception as exc:
            log_failure("adapter", exc)
        return self._send(message)

    def _stop_and_keep(self) -> None:
        # (the core stops a profile once: a second call returns at once)
        route = None
        try:  # known now (the router ran), relative to our own mount point
            route = route_template(self._scope, root_path=self._active.facts.root_path)
        except Exception as exc:  # the app's route object: the profile ends all the same
            log_failure("adapter", exc)
        try:
            self._core.finish(
                self._active, status_code=self.status_code, route=route, failed=self.failed
            )
        except Exception as exc:
            log_failure("profiler.finish", exc)

    def finish(self) -> None:
        """The app returned (or raised): end the profile if the last body did not."""
        if not self._active.finished:
            self._stop_and_keep()
        self._core.detach(self._active)
