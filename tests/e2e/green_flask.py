"""A Flask app with the middleware and no settings but the viewer, for gunicorn's gevent
worker (tests/e2e/test_green_threads.py)."""

from __future__ import annotations

import time

from flask import Flask

from demo_app.telemetry import configure_tracing
from otelprof_middleware import WSGIProfilingMiddleware

configure_tracing("otelprof-e2e-green")


def green_marker_work(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sum(range(50))


app = Flask(__name__)


@app.get("/spin")
def spin() -> str:
    green_marker_work(0.3)
    return "spun"


@app.get("/fast")
def fast() -> str:
    return "fast"


app.wsgi_app = WSGIProfilingMiddleware(app.wsgi_app, debug_route=True)  # type: ignore[method-assign]
