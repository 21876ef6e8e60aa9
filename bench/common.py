"""Names shared by the apps, the runner, the report and the in-process measurements."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterable, Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

__all__ = [
    "COMPETITOR_VARIANTS",
    "CONNECTIONS",
    "ENDPOINTS",
    "FIB_N",
    "SERVER_NAMES",
    "SINK_VARIANTS",
    "SWEEP_CONNECTIONS",
    "SWEEP_VARIANTS",
    "VARIANTS",
    "DroppingExporter",
    "cpu_work",
    "fib",
]

VARIANTS = (
    "bare",
    "otel",
    "reference",
    "floor",
    "lean",
    "ours_off",
    "ours_defaults",
    "ours_defaults_otlp",
    "ours_1pct",
    "ours_all",
    "ours_always_on",
    "ours_always_on_slow",
    "pyroscope_otel",
    "sentry_continuous",
)
COMPETITOR_VARIANTS = ("pyroscope_otel", "sentry_continuous")
"""Other profilers, set up as their docs say, measured in the same run (not installed with
the package: ``pip install pyroscope-io pyroscope-otel sentry-sdk``)."""
SINK_VARIANTS = ("ours_defaults_otlp", *COMPETITOR_VARIANTS)
"""Variants that send profiles out: to ``bench.otlp_sink``, as to a server elsewhere."""
ENDPOINTS = ("/tiny", "/cpu", "/io")
CONNECTIONS = {"/tiny": 16, "/cpu": 16, "/io": 64}
"""wrk connections per endpoint in the main measurements."""
SWEEP_VARIANTS = ("otel", "reference", "ours_all", "ours_defaults", "ours_1pct")
SWEEP_CONNECTIONS = (8, 32, 64)
SERVER_NAMES = {"asgi": "uvicorn + Starlette (ASGI)", "wsgi": "gunicorn gthread + Flask (WSGI)"}

FIB_N = 12
"""``fib(12)`` makes 465 Python calls: many small calls, as real request code does."""


def fib(n: int) -> int:
    """Naive recursive Fibonacci: the call-heavy unit of work."""
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def cpu_work(iterations: int) -> int:
    """``iterations`` calls of ``fib(FIB_N)``; returns a checksum so nothing is elided."""
    total = 0
    for _ in range(iterations):
        total += fib(FIB_N)
    return total


class DroppingExporter(SpanExporter):
    """Accepts every batch and discards it: the SDK's full cost, no network."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def package_versions(names: Iterable[str]) -> dict[str, str | None]:
    """Each installed distribution's version (None: not installed), for a run's metadata."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions
