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


def green_alpha_work(seconds: float) -> None:
    """CPU work that lets the worker's other greenlets run between its steps."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sum(range(50))
        time.sleep(0)  # (gevent's: a switch to the other greenlets)


def green_beta_work(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sum(range(50))
        time.sleep(0)


app = Flask(__name__)


@app.get("/spin")
def spin() -> str:
    green_marker_work(0.3)
    return "spun"


@app.get("/alpha")
def alpha() -> str:
    green_alpha_work(0.3)
    return "alpha"


@app.get("/beta")
def beta() -> str:
    green_beta_work(0.3)
    return "beta"


@app.get("/fast")
def fast() -> str:
    return "fast"


app.wsgi_app = WSGIProfilingMiddleware(app.wsgi_app, debug_route=True)  # type: ignore[method-assign]
