"""The server span is read from OTel's contextvar directly, exactly as the API reads it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from opentelemetry.trace.propagation import _SPAN_KEY

from otelprof_middleware.profiling import _span
from otelprof_middleware.profiling._span import current_server_span


@pytest.fixture
def tracer() -> Iterator[trace.Tracer]:
    provider = TracerProvider()
    yield provider.get_tracer("test")
    provider.shutdown()


def test_the_fast_read_is_in_use_here() -> None:
    assert _span._SLOT is not None  # the API's default runtime: the contextvar is read


def test_joins_the_current_local_span(tracer: trace.Tracer) -> None:
    for _ in range(3):  # the first read goes through the API, the next ones do not
        with tracer.start_as_current_span("server", kind=trace.SpanKind.SERVER) as span:
            joined = current_server_span()
            assert joined is not None
            assert joined[0] is span
            assert joined[1] == span.get_span_context()
    assert current_server_span() is None  # no span current


@pytest.mark.parametrize(
    ("kind", "attributes", "joins"),
    [
        (trace.SpanKind.SERVER, {}, True),
        # OTel's ASGI/WSGI middleware under a span already current (the request's own)
        (trace.SpanKind.INTERNAL, {"http.request.method": "GET"}, True),
        (trace.SpanKind.INTERNAL, {"http.method": "GET"}, True),
        # a span around the whole server (a CLI command's): every request's, none's own
        (trace.SpanKind.INTERNAL, {"process.command": "granian"}, False),
        (trace.SpanKind.CLIENT, {}, False),
    ],
)
def test_only_a_requests_span_is_joined(
    tracer: trace.Tracer, kind: trace.SpanKind, attributes: dict[str, str], joins: bool
) -> None:
    with tracer.start_as_current_span("span", kind=kind, attributes=attributes) as span:
        joined = current_server_span()
        assert (joined is not None and joined[0] is span) is joins


def test_a_remote_parent_is_not_joined() -> None:
    remote = NonRecordingSpan(
        SpanContext(0x1234, 0x5678, is_remote=True, trace_flags=TraceFlags(1))
    )
    token = otel_context.attach(trace.set_span_in_context(remote))
    try:
        assert current_server_span() is None
    finally:
        otel_context.detach(token)


def test_a_value_that_is_not_a_span_reads_as_no_span(tracer: trace.Tracer) -> None:
    with tracer.start_as_current_span("warm"):
        current_server_span()  # the SDK's span type is now known to the fast read
    token = otel_context.attach(otel_context.set_value(_SPAN_KEY, "not a span"))
    try:
        assert trace.get_current_span() is trace.INVALID_SPAN  # the API's reading
        assert current_server_span() is None
    finally:
        otel_context.detach(token)


def test_another_runtime_context_is_read_through_the_api(
    tracer: trace.Tracer, monkeypatch: pytest.MonkeyPatch
) -> None:
    class OtherRuntime:  # a runtime context the fast read does not know: it steps aside
        def __init__(self) -> None:
            self.current = otel_context.Context()

        def attach(self, context: otel_context.Context) -> object:
            previous, self.current = self.current, context
            return previous

        def get_current(self) -> otel_context.Context:
            return self.current

        def detach(self, token: object) -> None:
            self.current = token  # type: ignore[assignment]

    with tracer.start_as_current_span("warm"):
        current_server_span()
    monkeypatch.setattr(otel_context, "_RUNTIME_CONTEXT", OtherRuntime())
    assert current_server_span() is None  # the contextvar still holds nothing for it
    with tracer.start_as_current_span("server", kind=trace.SpanKind.SERVER) as span:
        joined = current_server_span()
        assert joined is not None and joined[0] is span
