"""A Flask app that serves requests in gunicorn's master before it forks (a warm-up),
with the middleware added with no arguments: for the ``--preload`` tests."""

from __future__ import annotations

import os
import time

from flask import Flask, Response, jsonify, request

import otelprof_middleware
from demo_app.telemetry import configure_tracing
from otelprof_middleware import WSGIProfilingMiddleware

WARM_UP_REQUESTS = 40

configure_tracing("otelprof-e2e-preload")
app = Flask(__name__)
app.wsgi_app = WSGIProfilingMiddleware(app.wsgi_app)  # type: ignore[method-assign]


@app.get("/counters")
def counters() -> Response:
    """This worker's pid and counters; ``?hold=S``: answer S seconds later (so that
    concurrent requests keep a worker busy and reach the other one)."""
    answer = jsonify(pid=os.getpid(), counters=otelprof_middleware.counters())
    time.sleep(float(request.args.get("hold", "0")))
    return answer


def _warm_up() -> None:
    client = app.test_client()
    for _ in range(WARM_UP_REQUESTS):
        client.get("/counters").close()  # (closed: the profile ends and is kept)
    deadline = time.monotonic() + 10
    while otelprof_middleware.counters().get("written", 0) < WARM_UP_REQUESTS:
        if time.monotonic() > deadline:
            raise RuntimeError(f"warm-up profiles not written: {otelprof_middleware.counters()}")
        time.sleep(0.05)


_warm_up()
