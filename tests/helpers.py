"""Test helpers: real OTel SDK providers with in-memory exporters, marker work, renders."""

from __future__ import annotations

import time

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from pyinstrument.renderers import ConsoleRenderer
from pyinstrument.session import Session


def make_provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def server_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]


def spin(seconds: float) -> int:
    end = time.perf_counter() + seconds
    total = 0
    while time.perf_counter() < end:
        total += sum(range(50))
    return total


def spin_cpu(cpu_seconds: float, wall_limit: float = 2.0) -> int:
    """Burn ``cpu_seconds`` of this thread's CPU time (``wall_limit`` of wall time at most)."""
    start = time.thread_time()
    deadline = time.perf_counter() + wall_limit
    total = 0
    while time.thread_time() - start < cpu_seconds and time.perf_counter() < deadline:
        total += sum(range(50))
    return total


def marker_alpha(seconds: float = 0.02) -> int:
    return spin(seconds)


def marker_beta(seconds: float = 0.02) -> int:
    return spin(seconds)


def text_of(session: Session) -> str:
    return ConsoleRenderer(unicode=False, color=False, show_all=True).render(session)
