"""A test-only Django middleware that makes its own span current, as DjangoInstrumentor does."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from opentelemetry import trace

PROVIDER: trace.TracerProvider | None = None
"""Set by the test: where the child spans are recorded."""


class ChildSpanMiddleware:
    """Runs the rest of the request inside an INTERNAL span ``django.request``."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response
        self._is_async = iscoroutinefunction(get_response)
        if self._is_async:
            markcoroutinefunction(self)

    def _tracer(self) -> trace.Tracer:
        return trace.get_tracer(__name__, tracer_provider=PROVIDER)

    def __call__(self, request: Any) -> Any:
        if self._is_async:
            return self._acall(request)
        with self._tracer().start_as_current_span("django.request"):
            return self.get_response(request)

    async def _acall(self, request: Any) -> Any:
        with self._tracer().start_as_current_span("django.request"):
            return await self.get_response(request)
