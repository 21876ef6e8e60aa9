"""``WSGIProfilingMiddleware``: the WSGI adapter (Flask, Django's WSGI app, any WSGI app)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Unpack

from opentelemetry import trace
from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware

from ._config import Config, Settings
from ._profiler import ActiveProfile, LazyStore, ProfilerCore, safe_host
from ._session import add_stem_marker
from ._span import ROUTE_KEY, current_server_span, redact_viewer_token, route_attribute
from ._threads import install as install_worker_thread_profiling
from ._types import ExcInfo, StartResponse, WSGIApp, WSGIEnvironment
from .stores._base import ProfileStore
from .viewer import Viewer, ViewerRequest

__all__ = ["WSGIProfilingMiddleware"]


class WSGIProfilingMiddleware:
    """Profile sampled requests of a WSGI app and link each profile from its span.

    The profile covers the whole response: it ends when the server calls the body's
    ``close()``, so streamed (generator) bodies are profiled until their last chunk.

    Example::

        from flask import Flask
        from otelprof_middleware import WSGIProfilingMiddleware

        app = Flask(__name__)
        app.wsgi_app = WSGIProfilingMiddleware(app.wsgi_app, sample_rate=0.1)

    Args:
        app: the WSGI application to wrap.
        tracer_provider: used only when no instrumentation opened a server span; then
            this middleware opens one through opentelemetry-instrumentation-wsgi.
        profile_store: a store instance (tests, custom backends) instead of the
            ``store`` URL.
        **settings: every :class:`~otelprof_middleware.Config` field (also read from
            ``OTELPROF_*`` environment variables; an explicit argument wins).

    Raises:
        ValueError: a setting or ``OTELPROF_*`` variable is invalid (named in the message).
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
        self.config = Config.load(**settings)
        self._core = ProfilerCore(self.config, store=profile_store)
        self._sampler = self._core.sampler
        self._trigger_key = "HTTP_" + self.config.trigger_header.upper().replace("-", "_")
        self._viewer = (
            Viewer(
                LazyStore(self._core),
                token=self.config.debug_token,
                public_url=self.config.public_url,
            )
            if self.config.debug_route
            else None
        )
        self._traced_app = OpenTelemetryMiddleware(self._profiled, tracer_provider=tracer_provider)
        if self.config.enabled:
            install_worker_thread_profiling()

    @property
    def core(self) -> ProfilerCore:
        """The framework-agnostic core (store, writer, counters), for tests and tools."""
        return self._core

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path: str = environ.get("PATH_INFO", "") or "/"
        if self._viewer is not None and self._viewer.handles(path):
            return self._serve_viewer(self._viewer, environ, start_response)
        if self._sampler.is_excluded(path):
            return self.app(environ, start_response)
        if current_server_span() is None:
            result: Iterable[bytes] = self._traced_app(environ, start_response)
            return result
        return self._profiled(environ, start_response)

    def _profiled(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        trigger = None
        if self._sampler.triggers_allowed and self._trigger_key in environ:
            trigger = str(environ[self._trigger_key]).encode("latin-1", "replace")
        active = self._core.start(
            trace.get_current_span(),
            method=environ.get("REQUEST_METHOD", "GET"),
            trigger=trigger,
            client_host=environ.get("REMOTE_ADDR"),
        )
        if active is None:
            return self.app(environ, start_response)
        self._core.link(active, lambda: self._base_url(environ))  # made only if needed
        status = 500
        route: str | None = None

        def start_profiled(
            status_line: str,
            headers: list[tuple[str, str]],
            exc_info: ExcInfo | None = None,
            /,
        ) -> Callable[[bytes], object]:
            nonlocal status, route
            code = status_line.split(" ", 1)[0]
            status = int(code) if code.isdigit() else 500
            # Flask's request (with its matched rule) is in the environ only until the
            # app returns, so the route template is read here.
            rule = getattr(getattr(environ.get("werkzeug.request"), "url_rule", None), "rule", None)
            if not isinstance(rule, str):  # Django: otelprof_middleware.django.RouteMiddleware
                rule = environ.get(ROUTE_KEY)
            route = rule if isinstance(rule, str) else None
            return start_response(status_line, headers, exc_info)

        def finish() -> None:
            self._finish(active, environ, status, route)

        try:
            body = self.app(environ, start_profiled)
        except BaseException:
            finish()
            self._core.detach(active)
            raise
        return _ProfiledBody(body, finish, active, self._core)

    def _finish(
        self, active: ActiveProfile, environ: WSGIEnvironment, status_code: int, route: str | None
    ) -> None:
        if not self._core.stop(active):
            return  # already stopped, or too short to keep: nothing more to work out
        route = route or route_attribute(active.span) or ""
        self._core.keep(
            active, status_code=status_code, route=route, base_url=self._base_url(environ)
        )

    def _base_url(self, environ: WSGIEnvironment) -> str:
        host = safe_host(environ.get("HTTP_HOST")) or safe_host(
            f"{environ.get('SERVER_NAME', 'localhost')}:{environ.get('SERVER_PORT', '80')}"
        )
        return self.config.base_url(
            environ.get("wsgi.url_scheme", "http"), host, environ.get("SCRIPT_NAME", "")
        )

    def _serve_viewer(
        self, viewer: Viewer, environ: WSGIEnvironment, start_response: StartResponse
    ) -> Iterable[bytes]:
        if "token=" in str(environ.get("QUERY_STRING", "")):
            redact_viewer_token(trace.get_current_span())
        headers = {
            key[5:].replace("_", "-").lower(): str(value)
            for key, value in environ.items()
            if key.startswith("HTTP_")
        }
        request = ViewerRequest(
            method=environ.get("REQUEST_METHOD", "GET"),
            path=environ.get("PATH_INFO", ""),
            query_string=str(environ.get("QUERY_STRING", "")).encode("latin-1", "replace"),
            headers=headers,
            client_host=environ.get("REMOTE_ADDR"),
            scheme=environ.get("wsgi.url_scheme", "http"),
            host=safe_host(headers.get("host")),
        )
        response = viewer.handle(request)
        start_response(f"{response.status} {_reason(response.status)}", list(response.headers))
        return [response.body]


add_stem_marker(WSGIProfilingMiddleware._profiled.__code__)


class _ProfiledBody:
    """The app's body, unchanged; ``close()`` (or exhaustion failure) ends the profile."""

    __slots__ = ("_active", "_body", "_core", "_finish")

    def __init__(
        self,
        body: Iterable[bytes],
        finish: Callable[[], None],
        active: ActiveProfile,
        core: ProfilerCore,
    ) -> None:
        self._body = body
        self._finish = finish
        self._active = active
        self._core = core

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        try:
            close: Any = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._finish()
            self._core.detach(self._active)


_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    422: "Unprocessable Content",
    503: "Service Unavailable",
}


def _reason(status: int) -> str:
    return _REASONS.get(status, "Unknown")
