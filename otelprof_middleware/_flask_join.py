"""Join FlaskInstrumentor's server span from inside Flask, as the ASGI adapter joins
FastAPI's from inside FastAPI.

``FlaskInstrumentor`` opens its server span in a ``before_request`` hook, after every WSGI
middleware has been called: the WSGI adapter finds no span at its entry. Opening one there
(what it does for an app no instrumentation traces) gave two spans per request: ours, the
server span, and Flask's, demoted to an ``INTERNAL`` child; and the instrumentor's
``excluded_urls`` no longer kept health checks out of the traces. Instead, when the app
the adapter wraps is a Flask app that FlaskInstrumentor instrumented, the adapter passes
its requests through and profiles each one from hooks next to the instrumentor's own:
from just after its ``before_request`` (its span is current) to just before its
``teardown_request`` (its span still open, so the link can be put on it). The profile
covers what Flask's span covers; a request the instrumentor does not trace is not
profiled, as without us.

Found by looking, at the first request: the wrapped app is ``Flask.wsgi_app`` (bound to
the app) or the instrumentor's wrapper of it. Anything else keeps the adapter's own span.
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

__all__ = ["FlaskSpanJoiner", "instrumented_flask_app"]

_ACTIVE_KEY = "otelprof.flask_profile"
"""The environ key of the request's profile between the two hooks."""
_INSTRUMENTATION_MODULE = "opentelemetry.instrumentation.flask"


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
    """Profiles a Flask app's requests from hooks next to FlaskInstrumentor's.

    Args:
        core: the adapter's engine.
        describe: the adapter's description of a request (its environ).
        is_excluded: the adapter's ``exclude_paths`` rule.
    """

    def __init__(
        self,
        core: ProfilerCore,
        describe: Callable[[WSGIEnvironment], RequestFacts],
        is_excluded: Callable[[str], bool],
    ) -> None:
        self._core = core
        self._describe = describe
        self._is_excluded = is_excluded

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
        try:
            from flask import request

            environ = request.environ
            if self._is_excluded(environ.get("PATH_INFO", "") or "/"):
                return
            joined = current_server_span()
            if joined is None:
                return  # the instrumentor traces not this one (its excluded_urls)
            active = self._core.start(joined[0], joined[1], self._describe(environ))
            if active is not None:
                environ[_ACTIVE_KEY] = active
        except Exception as exc:
            log_failure("profiler.start", exc)

    def end(self, error: BaseException | None) -> None:
        """``teardown_request``: stop the profile and keep it if the policy says so."""
        try:
            from flask import request

            active: ActiveProfile | None = request.environ.pop(_ACTIVE_KEY, None)
            if active is None:
                return
            rule = getattr(request.url_rule, "rule", None)
            try:
                self._core.finish(
                    active,
                    status_code=_status(active, error),
                    route=rule if isinstance(rule, str) else None,
                    failed=error is not None,
                )
            finally:
                self._core.detach(active)
        except Exception as exc:
            log_failure("profiler.finish", exc)


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
