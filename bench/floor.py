"""The ``floor`` yardstick: the least per-request work any always-on profiling layer does.

Not a product and not a profiler: one slotted record per request, a contextvar set and
reset, the running task (ASGI) or thread (WSGI) registered and forgotten, the status noted
by a wrapped ``send`` / ``start_response``, the body's end seen (WSGI), the duration
recorded. ``bench.overhead`` measures it in-process and ``bench.run`` as the ``floor``
variant on the real servers, so the cost of ours reads against what no design can avoid.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import Callable
from typing import Any

from starlette.types import Receive, Scope, Send

__all__ = ["FloorASGIMiddleware", "FloorWSGIMiddleware"]


class _FloorRequest:
    __slots__ = ("began", "status")

    def __init__(self) -> None:
        self.began = time.perf_counter()
        self.status = 500


_floor_request: contextvars.ContextVar[_FloorRequest | None] = contextvars.ContextVar(
    "floor_request", default=None
)
_floor_registry: dict[object, _FloorRequest] = {}
_floor_durations: list[float] = []


def _floor_end(
    where: object, request: _FloorRequest, token: contextvars.Token[_FloorRequest | None]
) -> None:
    del _floor_registry[where]
    _floor_request.reset(token)
    _floor_durations.append(time.perf_counter() - request.began)
    if len(_floor_durations) > 1000:
        _floor_durations.clear()


class FloorASGIMiddleware:
    """The yardstick ``floor``: the least an always-on layer must do per request (no
    profile): one slotted record, a contextvar set and reset, the running task registered
    and forgotten, ``send`` wrapped to note the status, the duration recorded."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = _FloorRequest()
        token = _floor_request.set(request)
        task = asyncio.current_task()
        _floor_registry[task] = request

        def noting_send(message: Any) -> Any:
            if message["type"] == "http.response.start":
                request.status = message["status"]
            return send(message)

        try:
            await self.app(scope, receive, noting_send)
        finally:
            _floor_end(task, request, token)


class FloorWSGIMiddleware:
    """``floor`` for WSGI: as :class:`FloorASGIMiddleware`, the thread registered, and the body
    wrapped so that its end is seen."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = _FloorRequest()
        token = _floor_request.set(request)
        thread = threading.get_ident()
        _floor_registry[thread] = request

        def noting_start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
            request.status = int(status[:3])
            return start_response(status, headers, exc_info)

        body = self.app(environ, noting_start_response)

        return _FloorBody(body, lambda: _floor_end(thread, request, token))


class _FloorBody:
    __slots__ = ("_body", "_end")

    def __init__(self, body: Any, end: Callable[[], None]) -> None:
        self._body = body
        self._end = end

    def __iter__(self) -> Any:
        return iter(self._body)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()  # the app's own clean-up (Flask tears its request down here)
        finally:
            self._end()
