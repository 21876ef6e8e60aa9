"""``WSGIProfilingMiddleware``: the WSGI adapter (Flask, Django's WSGI app, any WSGI app)."""

from __future__ import annotations

import copy
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any, Unpack
from wsgiref.util import request_uri

from opentelemetry import context, propagate, trace
from opentelemetry.instrumentation.wsgi import (
    add_response_attributes,
    collect_request_attributes,
    get_default_span_name,
    wsgi_getter,
)
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode

from ._adapter_parts import build_parts
from ._config import Settings
from ._failsafe import log_failure
from ._fork import renew_locks_in_children
from ._inner_join import (
    JOINER_KEY,
    FalconSpanJoiner,
    FlaskSpanJoiner,
    InnerJoiner,
    django_joinable,
    instrumented_falcon_app,
    instrumented_flask_app,
    otel_wsgi_below,
)
from ._request import RequestFacts, normalise_method
from ._route_notes import (
    flask_rule_in_traceback,
    note_falcon_routes,
    note_flask_routes_on_errors,
    note_pyramid_routes,
)
from ._types import ExcInfo, StartResponse, WSGIApp, WSGIEnvironment
from .profiling._active_profile import ActiveProfile
from .profiling._engine import ProfilerCore
from .profiling._request_profile import add_stem_marker
from .profiling._span import (
    ROUTE_KEY,
    current_server_span,
    name_by_route,
    otel_excluded_urls,
)
from .stores._base import ProfileStore
from .viewer import serve_wsgi

__all__ = ["WSGIProfilingMiddleware"]


class WSGIProfilingMiddleware:
    """Profile sampled requests of a WSGI app and link each profile from its span.

    The profile covers the whole response: it ends when the body is used up or closed,
    whichever comes first, so streamed (generator) bodies are profiled until their last
    chunk.

    Example::

        from flask import Flask
        from otelprof_middleware import WSGIProfilingMiddleware

        app = Flask(__name__)
        app.wsgi_app = WSGIProfilingMiddleware(app.wsgi_app)  # the production defaults

    Args:
        app: the WSGI application to wrap.
        tracer_provider: used when no instrumentation opened a server span; then
            this middleware opens one of its own, with opentelemetry-instrumentation-wsgi's
            request attributes and name. Its resource also names the service of a profile
            whose span the sampler did not record (a triggered request). Default: the
            global provider.
        profile_store: a store instance (tests, custom backends) instead of the
            ``store`` URL.
        **settings: every :class:`~otelprof_middleware.Config` field (also read from
            ``OTELPROF_*`` environment variables; an explicit argument wins).

    An invalid setting or ``OTELPROF_*`` variable (or store URL) turns profiling off for
    this app and is logged as an error naming it; requests pass straight through.
    """

    def __init__(
        self,
        app: WSGIApp,
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
        self._trigger_key = "HTTP_" + self.config.trigger_header.upper().replace("-", "_")
        self._tracer = trace.get_tracer(__name__, tracer_provider=tracer_provider)
        # At the first request: is the app instrumented inside (FlaskInstrumentor,
        # DjangoInstrumentor)? Then its requests are profiled from in there. Checked
        # under a lock: the first requests of a threaded server arrive together, and one
        # that went on before the check ended would open a second server span.
        self._inside_checked = False
        self._joins_inside = False
        self._inside_lock = threading.Lock()
        renew_locks_in_children(self)
        self._joiner: InnerJoiner | None = None  # (Django: handed over)
        self._is_joiner = False  # a copy below OTel's WSGI middleware: joins or passes
        self._otel_excluded = otel_excluded_urls("WSGI")
        if self.config.enabled:
            note_flask_routes_on_errors(app)
            note_falcon_routes(app)
            note_pyramid_routes(app)

    @property
    def core(self) -> ProfilerCore:
        """The framework-agnostic core (store, writer, counters), for tests and tools."""
        return self._core

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        way = _PASS
        try:
            way = self._way(environ)
        except Exception as exc:  # never the app's: it has not been called yet
            log_failure("adapter", exc)
        if way is _PASS:
            return self.app(environ, start_response)
        if way is _VIEWER:
            assert self._viewer is not None
            return serve_wsgi(self._viewer, environ, start_response)
        if way is _OPEN_SPAN:
            return self._in_own_span(environ, start_response)
        span: trace.Span
        span_context: SpanContext
        span, span_context = way  # type: ignore[misc]  # the server span to join
        return self._profiled(environ, start_response, span, span_context)

    def _way(self, environ: WSGIEnvironment) -> tuple[trace.Span, SpanContext] | object:
        """The viewer, straight through, the server span to join (with its context), or
        one to open."""
        path: str = environ.get("PATH_INFO", "") or "/"
        if self._viewer is not None and self._viewer.handles(path):
            return _VIEWER
        if self._start_policy.is_excluded(path):
            return _PASS
        joined = current_server_span()
        if joined is not None:
            return joined
        if self._is_joiner:
            return _PASS  # OTel's middleware above traces not this one
        if not self._inside_checked:
            self._check_inside()
        if self._joins_inside:
            if self._joiner is not None:
                environ[JOINER_KEY] = self._joiner  # for Django's RouteMiddleware
            return _PASS  # the instrumentor opens the span inside: joined from there
        if self._otel_excluded is not None and self._otel_excluded.url_disabled(
            request_uri(environ)
        ):
            return _PASS  # as OTel's instrumentations leave it out: no span, no profile
        return _OPEN_SPAN

    def renew_locks(self) -> None:
        """In a forked child: a thread of the parent may have held the lock."""
        self._inside_lock = threading.Lock()

    def _check_inside(self) -> None:
        """Decide once, at the first request, whether requests are joined from inside
        the app; requests arriving meanwhile wait for the decision."""
        with self._inside_lock:
            if self._inside_checked:
                return
            try:
                self._joins_inside = self._join_inside()
            finally:  # (a failure is not retried at every request: our own span then)
                self._inside_checked = True

    def _join_inside(self) -> bool:
        """When FlaskInstrumentor, FalconInstrumentor or DjangoInstrumentor (with our
        RouteMiddleware) instrumented the app, or OTel's WSGI middleware is inside it,
        profile its requests from inside, under that span (see :mod:`._inner_join`),
        instead of opening a server span of ours. Runs once, at the first request."""
        joiner = InnerJoiner(self._core, self._describe, _path_of, self._start_policy.is_excluded)
        flask_app = instrumented_flask_app(self.app)
        if flask_app is not None:
            FlaskSpanJoiner(joiner).install(flask_app)
            return True
        falcon_app = instrumented_falcon_app(self.app)
        if falcon_app is not None:
            FalconSpanJoiner(joiner).install(falcon_app)
            return True
        if django_joinable(self.app):
            self._joiner = joiner
            return True
        owner = otel_wsgi_below(self.app)
        if owner is not None:  # it opens the server span: a joining copy of us below it
            below = copy.copy(self)
            below.app, below._viewer, below._is_joiner = owner.wsgi, None, True
            owner.wsgi = below
            return True
        return False

    def _in_own_span(
        self, environ: WSGIEnvironment, start_response: StartResponse
    ) -> Iterable[bytes]:
        """The request under a server span of ours, for apps no instrumentation traces.

        Not OpenTelemetry's WSGI middleware: it holds the span's context token across
        the body's iteration, in a generator that the garbage collector closes, in
        whatever context it runs then, when a client never closes the response (test
        clients); that logs errors and has crashed CPython 3.11. The span's context is
        current while the app is called and during each step of a streamed body's
        iteration and its close (:class:`_InSpanBody`), and the span ends when the body
        is exhausted or closed (or collected unused).
        """
        try:
            span = self._tracer.start_span(
                get_default_span_name(environ),
                context=propagate.extract(environ, getter=wsgi_getter),
                kind=SpanKind.SERVER,
                attributes=collect_request_attributes(environ),
            )
            token = context.attach(trace.set_span_in_context(span))
        except Exception as exc:
            log_failure("span", exc)
            return self.app(environ, start_response)
        root = str(environ.get("SCRIPT_NAME", ""))  # (a dispatcher inside may extend it)

        def start_traced(
            status: str, headers: list[tuple[str, str]], *exc_info: ExcInfo | None
        ) -> Callable[[bytes], object]:
            try:
                add_response_attributes(span, status, headers)
                method = normalise_method(str(environ.get("REQUEST_METHOD", "")))
                name_by_route(span, method, route_template(environ, root))
            except Exception as exc:
                log_failure("span", exc)
            return start_response(status, headers, *exc_info)

        try:
            return self._profiled(
                environ, start_traced, span, span.get_span_context(), partial(_end_span, span)
            )
        except BaseException as error:
            # The app raised before start_response (Flask with PROPAGATE_EXCEPTIONS, as in
            # debug mode; gunicorn's timeout): the route is still known, in the request
            # the app left behind or in the error's traceback.
            try:
                method = normalise_method(str(environ.get("REQUEST_METHOD", "")))
                name_by_route(span, method, route_template(environ, root, error))
            except Exception as exc:
                log_failure("span", exc)
            _end_span(span, error)
            raise
        finally:
            context.detach(token)

    def _profiled(
        self,
        environ: WSGIEnvironment,
        start_response: StartResponse,
        span: trace.Span,
        span_context: SpanContext,
        end_span: Callable[[BaseException | None], None] | None = None,
    ) -> Iterable[bytes]:
        """The app, profiled if the core decides so; ``span``: the server span (joined or
        ours), and its context; ``end_span`` runs when the body ends (with the error that
        ended it, if any)."""
        response: _ProfiledResponse | None = None
        try:
            active = self._core.start(span, span_context, self._describe(environ))
            if active is not None:
                response = _ProfiledResponse(self._core, active, environ, start_response)
        except Exception as exc:
            log_failure("profiler.start", exc)
        if response is None:
            body = self.app(environ, start_response)
            if end_span is None:
                return body
        else:
            try:
                body = self.app(environ, response.start_response)
            except BaseException as error:
                response.app_returned()
                response.app_raised(error)
                response.finish()
                raise
            response.app_returned()
        on_end, on_abandon = _body_ends(response, end_span)
        file_wrapper = environ.get("wsgi.file_wrapper")
        if isinstance(file_wrapper, type) and isinstance(body, file_wrapper):
            # The server's own file transfer (sendfile) runs no app code: the profile and
            # the span end here, and the server still sees its file wrapper.
            on_end(None)
            return body
        if hasattr(body, "__len__"):
            return _SizedClosingBody(body, on_end, on_abandon)
        if end_span is not None:  # our span: its context is current (see _InSpanBody)
            return _InSpanBody(body, on_end, on_abandon, context.get_current())
        return _ClosingBody(body, on_end, on_abandon)

    def _describe(self, environ: WSGIEnvironment) -> RequestFacts:
        """The request as the engine sees it."""
        trigger = None
        if self._start_policy.triggers_allowed and self._trigger_key in environ:
            trigger = str(environ[self._trigger_key]).encode("latin-1", "replace")
        method = str(environ.get("REQUEST_METHOD", "GET"))
        scheme = environ.get("wsgi.url_scheme", "http")
        host = environ.get("HTTP_HOST")
        headers = ()  # (the Host header is ``host``)
        server = (environ.get("SERVER_NAME", "localhost"), environ.get("SERVER_PORT", "80"))
        # The middleware's own mount point: a dispatcher inside the app (werkzeug's
        # DispatcherMiddleware) moves part of PATH_INFO into the environ's SCRIPT_NAME.
        root_path = str(environ.get("SCRIPT_NAME", ""))
        client_host = environ.get("REMOTE_ADDR")
        # In the fields' order: a class called with keywords builds a dict of them.
        return RequestFacts(method, scheme, host, headers, server, root_path, client_host, trigger)


add_stem_marker(WSGIProfilingMiddleware._profiled.__code__)

_PASS, _VIEWER, _OPEN_SPAN = object(), object(), object()


def _path_of(environ: WSGIEnvironment) -> str:
    return str(environ.get("PATH_INFO", "") or "/")


def route_template(
    environ: WSGIEnvironment, root: str = "", error: BaseException | None = None
) -> str | None:
    """The matched route template: Flask's URL rule, Django's pattern (RouteMiddleware),
    Bottle's route rule.

    Read when the app calls ``start_response``: Flask's request, with its matched rule,
    is in the environ only until the app returns. ``root``: the environ's
    ``SCRIPT_NAME`` when the middleware was called. A dispatcher inside the middleware
    (werkzeug's ``DispatcherMiddleware``) has moved its mount point into ``SCRIPT_NAME``
    since, and the app's template is relative to that: the mount point is put back in
    front (``/shop`` + ``/items/<int:item_id>``), as for a Starlette ``Mount``. ``error``:
    what the app raised instead of answering, for a Flask request whose rule is in the
    environ no more (:func:`~._route_notes.flask_rule_in_traceback`).
    """
    request = environ.get("werkzeug.request")
    rule = getattr(getattr(request, "url_rule", None), "rule", None)
    if not isinstance(rule, str):
        rule = environ.get(ROUTE_KEY)
    if not isinstance(rule, str):
        rule = getattr(environ.get("bottle.route"), "rule", None)
    if not isinstance(rule, str) and error is not None:
        rule = flask_rule_in_traceback(error)
    if not isinstance(rule, str) or not rule:
        return None
    script_name = environ.get("SCRIPT_NAME", "")
    if isinstance(script_name, str) and script_name != root and script_name.startswith(root):
        return script_name[len(root) :].rstrip("/") + rule  # (Bottle leaves "/" there)
    return rule


def _body_ends(
    response: _ProfiledResponse | None, end_span: Callable[[BaseException | None], None] | None
) -> tuple[Callable[[BaseException | None], None], Callable[[], None]]:
    """What ends the body: ``(on_end, on_abandon)``. ``on_end`` takes the error that the
    body's iteration raised, if any: a streamed body that fails after the app returned
    has failed as much as an app that raised (the profile is kept as ``error``, our span
    gets an error status). A profile under a span not ours (the common case) ends with
    the response's own methods: no closures made per request."""
    if end_span is None:
        assert response is not None  # (neither a span nor a profile: the body unwrapped)
        return response.body_ended, response.abandon

    def on_end(error: BaseException | None) -> None:
        if response is not None:
            response.body_ended(error)
        end_span(error)

    def on_abandon() -> None:
        if response is not None:
            response.abandon()
        end_span(None)

    return on_end, on_abandon


def _end_span(span: trace.Span, error: BaseException | None) -> None:
    try:
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        span.end()
    except Exception as exc:
        log_failure("span", exc)


class _ProfiledResponse:
    """One profiled request's response: its status, its route, and its profile's end.

    Everything here runs on the request path, so nothing may raise: failures are
    counted and logged by the core's fail-open helpers.
    """

    __slots__ = (
        "_active",
        "_core",
        "_environ",
        "_root",
        "_route",
        "_start_response",
        "_status",
        "failed",
    )

    def __init__(
        self,
        core: ProfilerCore,
        active: ActiveProfile,
        environ: WSGIEnvironment,
        start_response: StartResponse,
    ) -> None:
        self._core = core
        self._active = active
        self._environ = environ
        self._root = str(environ.get("SCRIPT_NAME", ""))  # before the app is called
        self._start_response = start_response
        self._status = 500
        self._route: str | None = None
        self.failed = False  # the app raised

    def start_response(
        self, status: str, headers: list[tuple[str, str]], *exc_info: ExcInfo | None
    ) -> Callable[[bytes], object]:
        """The app's ``start_response``: notes the status and the route, then passes on."""
        try:
            code = status.split(" ", 1)[0]
            self._status = int(code) if code.isdigit() else 500
            self._route = route_template(self._environ, self._root)
        except Exception as exc:
            log_failure("adapter", exc)
        return self._start_response(status, headers, *exc_info)

    def app_returned(self) -> None:
        """The app's call returned or raised: the engine notes when (cannot fail)."""
        self._active.app_returned()

    def body_ended(self, error: BaseException | None) -> None:
        """The body was exhausted or closed, or raised ``error`` while it was iterated (a
        failed request): the profile ends here (once; never raises)."""
        if error is not None:
            self.failed = isinstance(error, Exception)
        self.finish()

    def app_raised(self, error: BaseException) -> None:
        """The app raised instead of answering: a failed request. Its route is read now
        if ``start_response`` never ran: Flask with ``PROPAGATE_EXCEPTIONS`` (as under
        ``flask run --debug``) has noted it in the environ
        (:func:`~._route_notes.note_flask_routes_on_errors`); for a ``BaseException``
        (gunicorn's timeout) it is read from the error's traceback."""
        self.failed = isinstance(error, Exception)
        if self._route is None:
            try:
                self._route = route_template(self._environ, self._root, error)
            except Exception as exc:
                log_failure("adapter", exc)

    def finish(self) -> None:
        """Stop the profile and keep it when the keep policy says so (once; never raises)."""
        try:
            self._core.finish(
                self._active, status_code=self._status, route=self._route, failed=self.failed
            )
        except Exception as exc:
            log_failure("profiler.finish", exc)
        self._core.detach(self._active)

    def abandon(self) -> None:
        """The body was collected without ``close()``: stop the profile, keep nothing."""
        self._core.discard(self._active)


class _ClosingBody:
    """The app's body, unchanged; ``on_end`` runs once, when it is exhausted, raises or
    is closed.

    Exhausted, raising or closed, whichever comes first: servers close right after the
    last chunk, and test clients that read the body without closing it still see the
    request's span end and its profile kept, as with OpenTelemetry's own middleware. An
    error raised by the iteration is passed to ``on_end`` (then re-raised unchanged). A
    body collected unused and unclosed runs ``on_abandon`` instead. No context token is
    held across iteration, and nothing of ours on the way can raise.
    """

    __slots__ = ("_body", "_iterator", "_on_abandon", "_on_end")

    def __init__(
        self,
        body: Iterable[bytes],
        on_end: Callable[[BaseException | None], object],
        on_abandon: Callable[[], object],
    ) -> None:
        self._body = body
        self._iterator: Iterator[bytes] | None = None
        self._on_end: Callable[[BaseException | None], object] | None = on_end
        self._on_abandon = on_abandon

    def __iter__(self) -> Iterator[bytes]:
        if self._iterator is None:
            self._iterator = iter(self._body)
        return self

    def __next__(self) -> bytes:
        assert self._iterator is not None
        try:
            return next(self._iterator)
        except StopIteration:
            self._end()
            raise
        except BaseException as error:  # the body failed mid-stream: the request failed
            self._end(error)
            raise

    def close(self) -> None:
        # The app's close() once, however often ours is called: a generator iterating us
        # with ``yield from`` (OpenTelemetry's WSGI middleware) closes us when it is closed,
        # then again in its ``finally``.
        body, self._body = self._body, _CLOSED
        try:
            close: Any = getattr(body, "close", None)
            if close is not None:
                close()
        finally:
            if self._on_end is not None:  # (None: its exhaustion ended it)
                self._end()

    def _end(self, error: BaseException | None = None) -> None:
        on_end, self._on_end = self._on_end, None
        if on_end is not None:
            on_end(error)

    def __del__(self) -> None:
        if self._on_end is not None:
            self._on_end = None
            if not sys.is_finalizing():  # (the tracer provider has shut down by then)
                self._on_abandon()


_CLOSED: Iterable[bytes] = ()
"""A closed body's stand-in: nothing to iterate or close."""


class _InSpanBody(_ClosingBody):
    """A streamed body under the server span of ours: each step of its iteration, and
    its ``close()``, runs in the span's context, as the app's call did (and as under
    OpenTelemetry's WSGI middleware), so the spans and log records made while it streams
    (``stream_with_context``) belong to the request's trace. Each call attaches and
    detaches the context itself: no token is held between chunks."""

    __slots__ = ("_context",)

    def __init__(
        self,
        body: Iterable[bytes],
        on_end: Callable[[BaseException | None], object],
        on_abandon: Callable[[], object],
        span_context: context.Context,
    ) -> None:
        super().__init__(body, on_end, on_abandon)
        self._context = span_context

    def __next__(self) -> bytes:
        token = context.attach(self._context)
        try:
            return super().__next__()
        finally:
            context.detach(token)

    def close(self) -> None:
        token = context.attach(self._context)
        try:
            super().close()
        finally:
            context.detach(token)


class _SizedClosingBody(_ClosingBody):
    """A body with a length: ``len()`` passes through, because servers use it. PEP 3333
    lets a server set ``Content-Length`` itself for a one-item body (wsgiref and waitress
    do; without it, waitress answers chunked and closes the connection)."""

    __slots__ = ()

    def __len__(self) -> int:
        return len(self._body)  # type: ignore[arg-type]  # (checked before it was chosen)
