"""The background threads (writer, exporters) run outside the request that started them.

With ``opentelemetry-instrumentation-threading`` (installed by ``opentelemetry-bootstrap``),
a new thread runs in a copy of its starter's context. The exporters' thread starts on the
first kept profile, inside that request: each later HTTP post (traced by the httpx
instrumentation) was a ``POST`` client span in that request's trace, for as long as the
thread lived, and without the threading instrumentation a root span of its own.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable

import pytest
from opentelemetry import context, trace
from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY
from opentelemetry.sdk.trace import TracerProvider

from otelprof_middleware._background import BatchingThread


class _Probe(BatchingThread):
    """Records, per batch, the span current on the thread and whether instrumentation
    is suppressed there (what instrumented httpx, redis and sqlite3 check)."""

    def __init__(self) -> None:
        super().__init__("otelprof-probe", queue_size=8, batch_size=4)
        self.seen: list[tuple[bool, object]] = []

    def _process(self, items: list[object]) -> None:
        span_context = trace.get_current_span().get_span_context()
        self.seen.append((span_context.is_valid, context.get_value(_SUPPRESS_INSTRUMENTATION_KEY)))


@pytest.fixture
def threads_inherit_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the threading instrumentation does: run a new thread in its starter's context."""
    original_start: Callable[[threading.Thread], None] = threading.Thread.start

    def start(self: threading.Thread) -> None:
        starter_context = contextvars.copy_context()
        run = self.run
        self.run = lambda: starter_context.run(run)  # type: ignore[method-assign]
        original_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)


@pytest.mark.usefixtures("threads_inherit_context")
def test_a_thread_started_in_a_request_works_outside_its_span() -> None:
    tracer = TracerProvider().get_tracer("test")
    probe = _Probe()
    with tracer.start_as_current_span("GET /slow"):
        assert probe.offer("first kept profile")  # starts the thread, in the span
    assert probe.offer("a later profile")
    assert probe.flush()
    probe.close()
    assert probe.seen
    assert all(seen == (False, True) for seen in probe.seen), probe.seen


def test_the_caller_context_is_left_as_it_was() -> None:
    tracer = TracerProvider().get_tracer("test")
    probe = _Probe()
    with tracer.start_as_current_span("GET /slow") as span:
        assert probe.offer(1)
        assert probe.flush()
        assert trace.get_current_span() is span
        assert context.get_value(_SUPPRESS_INSTRUMENTATION_KEY) is None
    probe.close()
