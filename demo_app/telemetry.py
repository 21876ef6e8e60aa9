"""OpenTelemetry SDK set-up shared by the demo apps.

Spans go to the console by default, to an OTLP/HTTP collector when
``OTEL_EXPORTER_OTLP_ENDPOINT`` is set, and (for the end-to-end tests) as JSON lines to
``<OTELPROF_DEMO_SPANS_DIR>/spans-<pid>.jsonl`` when that variable is set.
"""

from __future__ import annotations

import os
import sys
import threading

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
)


def _one_line(span: ReadableSpan) -> str:
    return span.to_json(indent=None) + "\n"


def configure_tracing(service_name: str) -> TracerProvider:
    """Install a global TracerProvider for the demo and return it."""
    provider = TracerProvider(
        resource=Resource.create(
            {"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)}
        )
    )
    spans_dir = os.environ.get("OTELPROF_DEMO_SPANS_DIR")
    if spans_dir:
        os.makedirs(spans_dir, exist_ok=True)
        # Opened per process on first export (gunicorn forks workers after import).
        provider.add_span_processor(SimpleSpanProcessor(_PerProcessFileExporter(spans_dir)))
    elif os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    ):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    else:
        provider.add_span_processor(
            BatchSpanProcessor(ConsoleSpanExporter(out=sys.stdout, formatter=_one_line))
        )
    trace.set_tracer_provider(provider)
    return provider


class _PerProcessFileExporter(ConsoleSpanExporter):
    """Writes each span as one JSON line to a file named after the current process."""

    def __init__(self, directory: str) -> None:
        self._directory = directory
        self._pid = -1
        self._lock = threading.Lock()
        super().__init__(out=sys.stdout, formatter=_one_line)

    def export(self, spans):  # type: ignore[no-untyped-def]
        # One lock for opening and writing: a server's threads export concurrently, and a
        # thread that saw the new pid before the file was open wrote its span to stdout.
        with self._lock:
            if self._pid != os.getpid():
                path = os.path.join(self._directory, f"spans-{os.getpid()}.jsonl")
                self.out = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
                self._pid = os.getpid()
            return super().export(spans)
