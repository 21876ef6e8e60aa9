"""Flask app for the honest-profiles tests under gunicorn gthread.

Each response reports how long its marker actually ran (``elapsed``, seconds), as the
FastAPI app's do.
"""

from __future__ import annotations

from collections.abc import Iterator

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import InternalServerError

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
            elapsed = MARKERS[n](seconds / 3)
            yield f"chunk {index} {elapsed}\n"

    return Response(body(), mimetype="text/plain")


class MarkerFailure(RuntimeError):
    def __init__(self, n: int, elapsed: float) -> None:
        super().__init__(f"marker {n} failed on purpose")
        self.elapsed = elapsed


@app.get("/wsgi-raise/<int:n>")
def raises(n: int) -> Response:
    raise MarkerFailure(n, MARKERS[n](_seconds()))


@app.errorhandler(InternalServerError)
def server_error(error: InternalServerError) -> tuple[Response, int]:
    # (Flask's own 500 for an unhandled exception, with the marker's time in it)
    return jsonify(elapsed=getattr(error.original_exception, "elapsed", None)), 500
