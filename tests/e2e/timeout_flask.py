"""A Flask app with the middleware added with no arguments but the viewer, and one view
that can outlive gunicorn's ``--timeout`` (``tests/e2e/test_gunicorn_timeout.py``)."""

from __future__ import annotations

import time

from flask import Flask, jsonify
from flask.typing import ResponseReturnValue

from demo_app.telemetry import configure_tracing
from otelprof_middleware import WSGIProfilingMiddleware

configure_tracing("otelprof-e2e-timeout")


def marker_outlived_the_timeout(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sum(range(50))


app = Flask(__name__)


@app.get("/reports/<int:report_id>")
def report(report_id: int) -> ResponseReturnValue:
    marker_outlived_the_timeout(report_id / 1000)
    return jsonify(report=report_id)


app.wsgi_app = WSGIProfilingMiddleware(app.wsgi_app, debug_route=True)  # type: ignore[method-assign]
