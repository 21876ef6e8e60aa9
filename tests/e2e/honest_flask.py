"""Flask app for the honest-profiles tests under gunicorn gthread."""

from __future__ import annotations

from collections.abc import Iterator

from flask import Flask, Response, jsonify, request

from demo_app.telemetry import configure_tracing
from otelprof_middleware import WSGIProfilingMiddleware

from .markers import MARKERS

configure_tracing("otelprof-e2e-honest-flask")
app = Flask(__name__)
app.wsgi_app = WSGIProfilingMiddleware(  # type: ignore[method-assign]
    app.wsgi_app, sample_rate=1.0, debug_route=True, max_concurrent=128
)


def _seconds() -> float:
    return min(float(request.args.get("ms", "30")), 500.0) / 1000.0


@app.get("/wsgi/<int:n>")
def view(n: int) -> Response:
    return jsonify(elapsed=MARKERS[n](_seconds()))


@app.get("/wsgi-stream/<int:n>")
def stream(n: int) -> Response:
    seconds = _seconds()

    def body() -> Iterator[str]:
        for index in range(3):
            MARKERS[n](seconds / 3)
            yield f"chunk {index}\n"

    return Response(body(), mimetype="text/plain")


@app.get("/wsgi-raise/<int:n>")
def raises(n: int) -> Response:
    MARKERS[n](_seconds())
    raise RuntimeError(f"marker {n} failed on purpose")
