"""Join a framework instrumentation's server span from inside the framework, as the ASGI
adapter joins FastAPI's from inside FastAPI.

``FlaskInstrumentor`` opens its server span in a ``before_request`` hook and
``DjangoInstrumentor`` in a Django middleware: both after every ASGI/WSGI middleware has
been called, so the adapter finds no span at its entry. Opening one there (what it does
for an app no instrumentation traces) gave two spans per request: ours, the server span,
and the framework's, demoted to an ``INTERNAL`` child; and the instrumentor's
``excluded_urls`` no longer kept health checks out of the traces. Instead, when the app
the adapter wraps is instrumented that way, the adapter passes its requests through and
an :class:`InnerJoiner` profiles each one from inside, under the instrumentor's span:

* Flask: hooks next to the instrumentor's own, from just after its ``before_request``
  (its span is current) to just before its ``teardown_request`` (its span still open,
  so the link can be put on it);
* Falcon: a Falcon middleware of ours, after the instrumentor's (its span is current
  from ``process_request`` on, and still open in ``process_response``);
* Django under WSGI: :class:`~otelprof_middleware.django.RouteMiddleware`, listed after
  the instrumentor's middleware, around the rest of Django's handling; the adapter hands
  it the joiner in the request's environ (``JOINER_KEY``). Not under ASGI: there the
  instrumentor's middleware (sync only) runs in a worker thread, and a sync view then
  runs on that very thread (asgiref's thread-sensitive executor), where a profile
  started inside would not see it; the ASGI adapter keeps its own span and sees it.

The profile covers what the framework's span covers; a request the instrumentor does not
trace is not profiled, as without us. Found by looking, at the first request: anything
else keeps the adapter's own span.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from ._failsafe import log_failure
from ._request import RequestFacts
from ._types import WSGIEnvironment
from .profiling._active_profile import ActiveProfile
from .profiling._engine import ProfilerCore
from .profiling._request_profile import add_stem_marker
from .profiling._span import current_server_span

__all__ = [
    "JOINER_KEY",
    "FalconSpanJoiner",
    "FlaskSpanJoiner",
    "InnerJoiner",
    "django_joinable",
    "instrumented_falcon_app",
    "instrumented_flask_app",
    "otel_wsgi_below",
]

JOINER_KEY = "otelprof.inner_joiner"
"""The environ key under which the WSGI adapter hands Django's RouteMiddleware the joiner
(only when the app is instrumented that way)."""
_ACTIVE_KEY = "otelprof.falcon_profile"
"""The environ key of a Falcon request's profile between the two hooks."""
_ACTIVE_ATTRIBUTE = "_otelprof_profile"
"""The attribute of Flask's request object holding its profile between the two hooks (not
its environ: the app sees that one, and may dump or copy it)."""
_INSTRUMENTATION_MODULE = "opentelemetry.instrumentation.flask"
_FALCON_INSTRUMENTATION_MODULE = "opentelemetry.instrumentation.falcon"
_DJANGO_OTEL_MIDDLEWARE = (
    "opentelemetry.instrumentation.django.middleware.otel_middleware._DjangoMiddleware"
)
_DJANGO_OURS = "otelprof_middleware.django.RouteMiddleware"


class InnerJoiner:
    """Profiles requests from inside the framework, under its instrumentor's span.

    Args:
        core: the adapter's engine.
        describe: the WSGI adapter's description of a request (from its environ).
        path_of: the request's path (for ``exclude_paths``).
        is_excluded: the adapter's ``exclude_paths`` rule.
    """

    def __init__(
        self,
        core: ProfilerCore,
        describe: Callable[[WSGIEnvironment], RequestFacts],
        path_of: Callable[[WSGIEnvironment], str],
        is_excluded: Callable[[str], bool],
    ) -> None:
        self._core = core
        self._describe = describe
        self._path_of = path_of
        self._is_excluded = is_excluded

    def begin(self, environ: WSGIEnvironment) -> ActiveProfile | None:
        """Profile the request under the current span (the instrumentor's), if it is one
        of this process's and the request is not excluded. Never raises."""
        try:
            if self._is_excluded(self._path_of(environ)):
                return None
            joined = current_server_span()
            if joined is None:
                return None  # the instrumentor traces not this one (its excluded_urls)
            return self._core.start(joined[0], joined[1], self._describe(environ))
        except Exception as exc:
            log_failure("profiler.start", exc)
            return None

    def begin_in(self, environ: WSGIEnvironment) -> None:
        """:meth:`begin`, the profile kept in ``environ`` for :meth:`taken_from` (for a
        framework whose start and end hooks are two calls). Never raises."""
        active = self.begin(environ)
        if active is not None:
            environ[_ACTIVE_KEY] = active

    @staticmethod
    def taken_from(environ: WSGIEnvironment) -> ActiveProfile | None:
        """The profile :meth:`begin_in` kept in ``environ``, removed from it."""
        active: ActiveProfile | None = environ.pop(_ACTIVE_KEY, None)
        return active

    def drop(self, active: ActiveProfile) -> None:
        """Stop the profile and keep nothing. Never raises."""
        try:
            try:
                self._core.discard(active)
            finally:
                self._core.detach(active)
        except Exception as exc:
            log_failure("profiler.stop", exc)

    def end(
        self, active: ActiveProfile | None, *, status_code: int, route: str | None, failed: bool
    ) -> None:
        """Stop the profile and keep it if the policy says so. Never raises."""
        if active is None:
            return
        try:
            try:
                self._core.finish(active, status_code=status_code, route=route, failed=failed)
            finally:
                self._core.detach(active)
        except Exception as exc:
            log_failure("profiler.finish", exc)


def django_joinable(app: object) -> bool:
    """Whether ``app`` is Django's handler with ``DjangoInstrumentor``'s middleware and,
    after it, our ``RouteMiddleware`` in ``MIDDLEWARE`` (which then joins its span).
    Imports nothing."""
    handlers = sys.modules.get("django.core.handlers.base")
    conf = sys.modules.get("django.conf")
    if handlers is None or conf is None:
        return False
    layer: object = app
    for _ in range(4):  # through a wrapper or two (WhiteNoise's ``application``, say)
        if isinstance(layer, handlers.BaseHandler):
            break
        layer = getattr(layer, "application", None) or getattr(layer, "app", None)
        if layer is None:
            return False
    else:
        return False
    settings = conf.settings
    if not settings.configured:
        return False
    middleware = [str(name) for name in getattr(settings, "MIDDLEWARE", None) or ()]
    return (
        _DJANGO_OTEL_MIDDLEWARE in middleware
        and _DJANGO_OURS in middleware
        and middleware.index(_DJANGO_OTEL_MIDDLEWARE) < middleware.index(_DJANGO_OURS)
    )


def instrumented_flask_app(app: object) -> Any | None:
    """The Flask app behind ``app`` (a WSGI callable) when FlaskInstrumentor instrumented
    it, else None. Imports nothing: Flask and the instrumentation are used only when
    already imported."""
    flask = sys.modules.get("flask")
    if flask is None:
        return None
    layer: object = app
    for _ in range(4):
        owner = getattr(layer, "__self__", None)
        if isinstance(owner, flask.Flask):
            if getattr(owner, "_is_instrumented_by_opentelemetry", False) and callable(
                getattr(owner, "_before_request", None)
            ):
                return owner
            return None
        inner = _instrumentation_wrapped(layer)
        if inner is None:
            return None
        layer = inner
    return None


def _instrumentation_wrapped(layer: object) -> object | None:
    """The ``wsgi_app`` that FlaskInstrumentor's wrapper function calls (from its
    closure), or None when ``layer`` is not that wrapper."""
    code = getattr(layer, "__code__", None)
    closure = getattr(layer, "__closure__", None)
    if code is None or closure is None:
        return None
    if getattr(layer, "__module__", None) != _INSTRUMENTATION_MODULE:
        return None
    try:
        wrapped: object = closure[code.co_freevars.index("wsgi_app")].cell_contents
    except (ValueError, IndexError):
        return None
    return wrapped


class FlaskSpanJoiner:
    """The Flask hooks around an :class:`InnerJoiner`, next to FlaskInstrumentor's."""

    def __init__(self, joiner: InnerJoiner) -> None:
        self._joiner = joiner

    def install(self, flask_app: Any) -> None:
        """Put the hooks right after the instrumentor's: ours starts after its
        ``before_request`` and, as Flask runs teardowns in reverse, ends just before its
        ``teardown_request`` (after every teardown registered later)."""
        before = flask_app.before_request_funcs.setdefault(None, [])
        teardown = flask_app.teardown_request_funcs.setdefault(None, [])
        before.insert(_after(before, flask_app._before_request), self.start)
        teardown.insert(_after(teardown, getattr(flask_app, "_teardown_request", None)), self.end)
        # The profile's root: Flask's entry, as our adapter's frame is for our own span.
        add_stem_marker(type(flask_app).wsgi_app.__code__)

    def start(self) -> None:
        """``before_request``: profile the request under the span just opened, if any."""
        from flask import request  # (Flask runs this hook: it is imported)

        active = self._joiner.begin(request.environ)
        if active is not None:
            try:
                setattr(_flask_request_object(request), _ACTIVE_ATTRIBUTE, active)
            except Exception as exc:
                self._joiner.drop(active)
                log_failure("profiler.start", exc)

    def end(self, error: BaseException | None) -> None:
        """``teardown_request``: stop the profile and keep it if the policy says so."""
        try:
            from flask import request

            held: dict[str, Any] = vars(_flask_request_object(request))
            active = held.pop(_ACTIVE_ATTRIBUTE, None)
            if active is None:
                return
            rule = getattr(request.url_rule, "rule", None)
            status_code = _status(active, error)
        except Exception as exc:  # a hook of ours must never fail the request
            log_failure("profiler.finish", exc)
            return
        self._joiner.end(
            active,
            status_code=status_code,
            route=rule if isinstance(rule, str) else None,
            failed=error is not None,
        )


def _flask_request_object(proxy: object) -> object:
    """The request object behind Flask's ``request`` proxy (this request's own)."""
    get: Any = getattr(proxy, "_get_current_object")  # noqa: B009  (werkzeug's LocalProxy)
    return get()


def _after(hooks: list[Any], hook: object) -> int:
    """The index just after ``hook`` in ``hooks`` (the end when it is not there)."""
    for index, candidate in enumerate(hooks):
        if candidate is hook:
            return index + 1
    return len(hooks)


def _status(active: ActiveProfile, error: BaseException | None) -> int:
    """The response's status, as the instrumentor put it on its span (500 when the app
    raised and none was set)."""
    attributes = getattr(active.span, "attributes", None) or {}
    for key in ("http.response.status_code", "http.status_code"):
        value = attributes.get(key)
        if isinstance(value, int):
            return value
    return 500 if error is not None else 200


def instrumented_falcon_app(app: object) -> Any | None:
    """``app`` when it is a Falcon app that ``FalconInstrumentor`` instrumented (the
    instrumentor replaces ``falcon.App`` with a subclass that opens the span in
    ``__call__``), else None."""
    kind = type(app)
    if kind.__module__ != _FALCON_INSTRUMENTATION_MODULE:
        return None
    if not getattr(app, "_is_instrumented_by_opentelemetry", False):
        return None
    return app if callable(getattr(app, "add_middleware", None)) else None


class FalconSpanJoiner:
    """A Falcon middleware around an :class:`InnerJoiner`, after FalconInstrumentor's.

    Falcon calls ``process_request`` in order (the instrumentor's first, its span already
    current) and ``process_response`` in reverse (ours before the instrumentor's, which
    names its span, and before its span ends as the app call returns).
    """

    def __init__(self, joiner: InnerJoiner) -> None:
        self._joiner = joiner

    def install(self, falcon_app: Any) -> None:
        """Put this middleware right after the instrumentor's, so that the profile covers
        the other middlewares' hooks too; appended when the list is not where Falcon 3.1+
        keeps it. ``add_middleware`` prepares the list again either way."""
        middlewares = getattr(falcon_app, "_unprepared_middleware", None)
        if isinstance(middlewares, list):
            kinds = [type(m).__name__ for m in middlewares]
            at = kinds.index("_TraceMiddleware") + 1 if "_TraceMiddleware" in kinds else 0
            middlewares.insert(at, self)
            falcon_app.add_middleware([])
        else:
            falcon_app.add_middleware(self)
        add_stem_marker(type(falcon_app).__call__.__code__)

    def process_request(self, req: Any, resp: Any) -> None:
        """Profile the request under the instrumentor's span, if it opened one."""
        self._joiner.begin_in(req.env)

    def process_response(
        self, req: Any, resp: Any, resource: object, req_succeeded: bool = True
    ) -> None:
        """Stop the profile and keep it if the policy says so."""
        try:
            active = self._joiner.taken_from(req.env)
            if active is None:
                return
            route = getattr(req, "uri_template", None)
            status_code = getattr(resp, "status_code", None)  # (Falcon 4)
            if not isinstance(status_code, int):  # "200 OK", 200 or HTTPStatus.OK
                code = str(getattr(resp.status, "value", resp.status)).split(" ", 1)[0]
                status_code = int(code) if code.isdigit() else 500
        except Exception as exc:  # a hook of ours must never fail the request
            log_failure("profiler.finish", exc)
            return
        self._joiner.end(
            active,
            status_code=status_code,
            route=route if isinstance(route, str) and route else None,
            failed=not req_succeeded,
        )


def otel_wsgi_below(app: object) -> Any | None:
    """OTel's WSGI ``OpenTelemetryMiddleware`` below ``app``, if there is one: followed
    through each layer's ``app``, and a Flask app's ``wsgi_app`` (where OTel's docs put
    it). It opens the server span when called, inside us: a joining copy of the adapter
    goes below it (its ``wsgi``)."""
    from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware

    seen: set[int] = set()
    layer: object | None = app
    while layer is not None and id(layer) not in seen and len(seen) < 64:
        seen.add(id(layer))
        if isinstance(layer, OpenTelemetryMiddleware):
            return layer
        layer = getattr(layer, "app", None) or getattr(layer, "wsgi_app", None)
    return None
