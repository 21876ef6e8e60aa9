"""Wrap every app a framework's own test suite builds in otelprof's middleware.

Used by ``compat_pytest`` (Starlette, FastAPI, Flask) and ``compat_django``; see
docs/compat.md. The wrapping is what a user does by hand, done for every app:

* Starlette and every subclass (FastAPI): the built middleware stack becomes
  ``ProfilingMiddleware(stack)``, the outermost layer of the app (inside FastAPI's own
  native telemetry, which wraps the stack).
* Flask: ``Flask.__call__`` goes through ``WSGIProfilingMiddleware`` around
  ``app.wsgi_app`` (outside any middleware a test puts on ``wsgi_app``).
* Django: the test client's handlers (``ClientHandler``, ``AsyncClientHandler``) and the
  apps ``get_wsgi_application()`` / ``get_asgi_application()`` return.

Settings come from ``OTELPROF_*`` variables over the harness defaults below, read once
and passed as keyword arguments (a test that clears the environment changes nothing).
A process-wide OpenTelemetry SDK ``TracerProvider`` (no exporter) is installed, so
spans record and profiles are kept.
"""

from __future__ import annotations

import contextvars
import functools
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from otelprof_middleware import ProfilingMiddleware, WSGIProfilingMiddleware
from otelprof_middleware import counters as otelprof_counters

__all__ = ["DEFAULTS", "install", "settings", "stats"]

DEFAULTS: dict[str, str] = {
    "sample_rate": "1.0",
    "store": "memory://",
    "min_duration_ms": "0",
    "mode": "hook",
}
"""The harness's settings, each overridable by its ``OTELPROF_*`` variable."""

_MARK = "__otelprof_compat__"
_wrapped: dict[str, int] = {}
_lock = threading.Lock()
_installed: set[str] = set()


@functools.cache
def settings() -> dict[str, Any]:
    """The middleware keyword arguments: ``DEFAULTS`` overridden by ``OTELPROF_*``.

    Read once (at :func:`install`): a test that changes the environment changes nothing.
    """
    return {
        name: os.environ.get("OTELPROF_" + name.upper(), value) for name, value in DEFAULTS.items()
    }


def stats() -> dict[str, Any]:
    """Apps wrapped per framework and otelprof's counters, for the harness report."""
    with _lock:
        wrapped = dict(_wrapped)
    return {"pid": os.getpid(), "wrapped": wrapped, "counters": otelprof_counters()}


def _note(kind: str) -> None:
    with _lock:
        _wrapped[kind] = _wrapped.get(kind, 0) + 1


def install(frameworks: Iterable[str] = ("starlette", "flask", "django")) -> list[str]:
    """Install the tracer provider and wrap each named framework that is importable.

    Idempotent. Returns the frameworks wrapped by this or an earlier call.
    """
    settings()
    _install_tracer_provider()
    installers: dict[str, Callable[[], None]] = {
        "starlette": _install_starlette,
        "flask": _install_flask,
        "django": _install_django,
    }
    for name in frameworks:
        if name in _installed:
            continue
        try:
            installers[name]()
        except ImportError:
            continue
        _installed.add(name)
    return sorted(_installed)


def _install_tracer_provider() -> None:
    if "tracer_provider" in _installed:
        return
    trace.set_tracer_provider(TracerProvider())  # records spans, exports none
    _installed.add("tracer_provider")


# --- Starlette / FastAPI -----------------------------------------------------------

_building = threading.local()


def _wrap_builder(original: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``build_middleware_stack`` returning ``ProfilingMiddleware(stack)``.

    Only the outermost call wraps: a subclass's override that calls ``super()`` gets
    the plain stack from the inner call, so an app never has two profiling layers.
    """

    @functools.wraps(original)
    def build_middleware_stack(self: Any) -> Any:
        depth: int = getattr(_building, "depth", 0)
        _building.depth = depth + 1
        try:
            stack = original(self)
        finally:
            _building.depth = depth
        if depth:
            return stack
        _note(type(self).__name__)
        return ProfilingMiddleware(stack, **settings())

    setattr(build_middleware_stack, _MARK, True)
    return build_middleware_stack


def _patch_builder(cls: type) -> None:
    own = cls.__dict__.get("build_middleware_stack")
    if own is not None and not getattr(own, _MARK, False):
        cls.build_middleware_stack = _wrap_builder(own)  # type: ignore[attr-defined]


def _install_starlette() -> None:
    from starlette.applications import Starlette

    def subclasses(cls: type) -> Iterable[type]:
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    _patch_builder(Starlette)
    for sub in subclasses(Starlette):  # FastAPI overrides the builder
        _patch_builder(sub)
    previous = Starlette.__dict__.get("__init_subclass__")

    def __init_subclass__(cls: type, **kwargs: Any) -> None:
        if previous is not None:
            previous.__func__(cls, **kwargs)
        else:
            super(Starlette, cls).__init_subclass__(**kwargs)
        _patch_builder(cls)

    Starlette.__init_subclass__ = classmethod(__init_subclass__)  # type: ignore[assignment]


# --- Flask ---------------------------------------------------------------------------

_FLASK_ATTR = "_otelprof_compat_middleware"


def _install_flask() -> None:
    from flask import Flask

    def __call__(self: Flask, environ: dict[str, Any], start_response: Any) -> Any:
        middleware = self.__dict__.get(_FLASK_ATTR)
        if middleware is None:
            # ``wsgi_app`` is looked up per request: tests replace it after the first one.
            app = functools.partial(_call_wsgi_app, self)
            middleware = WSGIProfilingMiddleware(app, **settings())
            self.__dict__[_FLASK_ATTR] = middleware
            _note("Flask")
        return middleware(environ, start_response)

    setattr(__call__, _MARK, True)
    Flask.__call__ = __call__  # type: ignore[method-assign]


def _call_wsgi_app(app: Any, environ: dict[str, Any], start_response: Any) -> Any:
    return app.wsgi_app(environ, start_response)


# --- Django --------------------------------------------------------------------------


@dataclass(slots=True)
class _ClientCall:
    """One test-client request: the handler to run and, once run, its response."""

    handler: Any
    response: Any = None


_client_call: contextvars.ContextVar[_ClientCall] = contextvars.ContextVar("otelprof_compat_call")


def _ignore_start_response(status: str, headers: list[Any], exc_info: Any = None) -> Any:
    return lambda data: None


async def _ignore_send(message: Any) -> None:
    return None


async def _disconnect() -> dict[str, Any]:
    return {"type": "http.disconnect"}


def _install_django() -> None:
    import django.core.asgi
    import django.core.wsgi
    from django.test import client

    sync_call = client.ClientHandler.__call__
    async_call = client.AsyncClientHandler.__call__

    # Django's test handlers take an environ / a scope and return the HttpResponse, so
    # each middleware wraps an adapter app: it runs the handler (found in a contextvar,
    # not in the environ, which becomes request.META) and stands in for the server.
    def sync_adapter(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        call = _client_call.get()
        call.response = sync_call(call.handler, environ)
        start_response(f"{call.response.status_code} {call.response.reason_phrase}", [])
        return []

    async def async_adapter(scope: dict[str, Any], receive: Any, send: Any) -> None:
        call = _client_call.get()
        call.response = await async_call(call.handler, scope)
        status = call.response.status_code
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    wsgi_middleware = _lazy(lambda: WSGIProfilingMiddleware(sync_adapter, **settings()))
    asgi_middleware = _lazy(lambda: ProfilingMiddleware(async_adapter, **settings()))

    def handler_call(self: Any, environ: dict[str, Any]) -> Any:
        token = _client_call.set(call := _ClientCall(self))
        try:
            body = wsgi_middleware()(environ, _ignore_start_response)
            close = getattr(body, "close", None)
            if close is not None:
                close()
        finally:
            _client_call.reset(token)
        _note("django ClientHandler requests")
        return call.response

    async def async_handler_call(self: Any, scope: dict[str, Any]) -> Any:
        token = _client_call.set(call := _ClientCall(self))
        try:
            await asgi_middleware()(scope, _disconnect, _ignore_send)
        finally:
            _client_call.reset(token)
        _note("django AsyncClientHandler requests")
        return call.response

    client.ClientHandler.__call__ = functools.wraps(sync_call)(handler_call)
    client.AsyncClientHandler.__call__ = functools.wraps(async_call)(async_handler_call)

    get_wsgi = django.core.wsgi.get_wsgi_application
    get_asgi = django.core.asgi.get_asgi_application

    @functools.wraps(get_wsgi)
    def get_wsgi_application() -> Any:
        _note("get_wsgi_application")
        return WSGIProfilingMiddleware(get_wsgi(), **settings())

    @functools.wraps(get_asgi)
    def get_asgi_application() -> Any:
        _note("get_asgi_application")
        return ProfilingMiddleware(get_asgi(), **settings())

    django.core.wsgi.get_wsgi_application = get_wsgi_application
    django.core.asgi.get_asgi_application = get_asgi_application


def _lazy(make: Callable[[], Any]) -> Callable[[], Any]:
    """``make()`` on first call, the same object after (one middleware per process)."""
    return functools.cache(make)
