"""A Flask app with FlaskInstrumentor (``excluded_urls="health"``) and the middleware with
no settings but the viewer (tests/e2e/test_flask_instrumentor.py)."""

from __future__ import annotations

import time

from flask import Flask
from opentelemetry.instrumentation.flask import FlaskInstrumentor

from demo_app.telemetry import configure_tracing
from otelprof_middleware import WSGIProfilingMiddleware

configure_tracing("otelprof-e2e-flask-instrumented")


def instrumented_marker_work(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sum(range(50))


app = Flask(__name__)


@app.get("/items/<int:item_id>")
def item(item_id: int) -> str:
    instrumented_marker_work(0.3 if item_id == 7 else 0.002)
    return f"item {item_id}"


@app.get("/health")
def health() -> str:
    return "ok"


FlaskInstrumentor().instrument_app(app, excluded_urls="health")
app.wsgi_app = WSGIProfilingMiddleware(app.wsgi_app, debug_route=True)  # type: ignore[method-assign]
