"""The ``lean`` yardstick: the leanest Python layer built from our own always-on parts.

Not a product: what the no-argument middleware does on a request that is not kept, written
as one function with none of the package's layering (no adapter/engine split, no request
description, no start policy, viewer, exclusion, fork or trio checks, no lazy link, no
producer task, no route lookup beyond Starlette's ``scope["route"]``). It joins the server
span, starts a :class:`~otelprof_middleware.profiling._request_profile.RequestProfile`,
registers it with the real always-on sampler (so the ticks sample it), notes the status
through a wrapped ``send`` / ``start_response``, and at the end unregisters it and asks the
real keep policy. It keeps nothing (no store, no link).

``ours_defaults`` minus ``lean`` is what the package's structure costs over the same
parts; ``lean`` minus ``floor`` is what the parts themselves cost (the sampler's
registration and ticks, the span read, the keep policy): the least a Python
implementation of this design could reach. ``bench.overhead`` measures it in-process and
``bench.run`` as the ``lean`` variant on the real servers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from otelprof_middleware import _clock
from otelprof_middleware._config import Config
from otelprof_middleware.profiling._keep_policy import KeepPolicy
from otelprof_middleware.profiling._request_profile import RequestProfile, current_request
from otelprof_middleware.profiling._span import current_server_span
from otelprof_middleware.profiling.always_on import always_on_sampler
from otelprof_middleware.profiling.always_on._sampler import AlwaysOnSampler

__all__ = ["LeanASGIMiddleware", "LeanWSGIMiddleware"]

_DEFAULTS = Config()
_INTERVAL = _DEFAULTS.always_on_interval_ms / 1000.0
_MAX_SAMPLES = _DEFAULTS.max_samples


def _keep_policy() -> KeepPolicy:
    return KeepPolicy(
        min_duration_ms=None,
        slow_floor_ms=_DEFAULTS.slow_floor_ms,
        keep_per_second=_DEFAULTS.keep_per_second,
    )


def _end(
    sampler: AlwaysOnSampler,
    keep_policy: KeepPolicy,
    request: RequestProfile,
    route: str,
    status: int,
) -> None:
    """The request ended (once: later calls return): unregister it, ask the keep policy."""
    if request.closed:
        return
    request.closed = True
    sampler.unregister_current(request)
    keep_policy.reason(
        route=route,
        duration=_clock.perf_counter() - request.start_perf,
        status_code=status,
        failed=False,
        triggered=False,
    )


class LeanASGIMiddleware:
    """``lean`` for ASGI (see the module)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.sampler = always_on_sampler(_INTERVAL)
        self.keep_policy = _keep_policy()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        joined = current_server_span() if scope["type"] == "http" else None
        if joined is None:
            await self.app(scope, receive, send)
            return
        request = RequestProfile(_INTERVAL, _MAX_SAMPLES, None, True)
        token = current_request.set(request)
        self.sampler.register_current(request)
        status = 500

        def end() -> None:
            route = getattr(scope.get("route"), "path", "")
            _end(self.sampler, self.keep_policy, request, route, status)

        def noting_send(message: Message) -> Any:
            nonlocal status
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
            elif kind == "http.response.body" and not message.get("more_body", False):
                end()
            return send(message)

        try:
            await self.app(scope, receive, noting_send)
        finally:
            end()
            current_request.reset(token)


class LeanWSGIMiddleware:
    """``lean`` for WSGI (see the module): the request ends when its body is closed."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.sampler = always_on_sampler(_INTERVAL)
        self.keep_policy = _keep_policy()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        joined = current_server_span()
        if joined is None:
            result: Iterable[bytes] = self.app(environ, start_response)
            return result
        request = RequestProfile(_INTERVAL, _MAX_SAMPLES, None, True)
        token = current_request.set(request)
        self.sampler.register_current(request)
        status = [500]

        def noting_start_response(status_line: str, headers: Any, exc_info: Any = None) -> Any:
            status[0] = int(status_line[:3])
            return start_response(status_line, headers, exc_info)

        def end() -> None:
            if not request.closed:
                _end(
                    self.sampler, self.keep_policy, request, environ.get("PATH_INFO", ""), status[0]
                )
                current_request.reset(token)

        try:
            body = self.app(environ, noting_start_response)
        except BaseException:
            end()
            raise
        return _LeanBody(body, end)


class _LeanBody:
    __slots__ = ("_body", "_end")

    def __init__(self, body: Iterable[bytes], end: Callable[[], None]) -> None:
        self._body = body
        self._end = end

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._end()
