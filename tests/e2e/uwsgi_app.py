"""A Flask app for the uWSGI tests: the middleware with no arguments, and a warm-up at
import, so that the process loading it (uWSGI's master, or the process that forks the
workers) serves requests before the workers are forked."""

from __future__ import annotations

import json
import os
import threading

from flask import Flask, Response, jsonify, request

import otelprof_middleware
from demo_app.telemetry import configure_tracing
from otelprof_middleware import WSGIProfilingMiddleware

from .markers import MARKERS

WARM_UP_REQUESTS = 5

configure_tracing("otelprof-e2e-uwsgi")
app = Flask(__name__)
app.wsgi_app = WSGIProfilingMiddleware(app.wsgi_app)  # type: ignore[method-assign]


@app.get("/marker/<int:n>")
def marker(n: int) -> Response:
    return jsonify(elapsed=MARKERS[n](float(request.args.get("ms", "300")) / 1000.0))


@app.get("/counters")
def counters() -> Response:
    return jsonify(pid=os.getpid(), counters=otelprof_middleware.counters())


def _warm_up() -> None:
    client = app.test_client()
    for _ in range(WARM_UP_REQUESTS):
        client.get("/counters").close()
    # What the loading process runs once warmed up (read by the tests): uWSGI forks the
    # workers from it next, from C, and a thread of ours running then could hang them.
    threads = sorted(thread.name for thread in threading.enumerate())
    state = os.environ["OTELPROF_STATE_DIR"]
    os.makedirs(state, exist_ok=True)
    with open(os.path.join(state, f"loader-{os.getpid()}.json"), "w") as out:
        json.dump({"threads": threads, "counters": otelprof_middleware.counters()}, out)


_warm_up()
