"""The Flask demo: ``python -m demo_app --flask`` or ``gunicorn demo_app.flask_app:app``."""

from __future__ import annotations

import time
from collections.abc import Iterator

from flask import Flask, Response, jsonify, request

from otelprof_middleware import WSGIProfilingMiddleware

from .settings import demo_settings
from .telemetry import configure_tracing
from .work import DemoFailure, crunch_numbers, hash_report, load_settings, render_chunk

configure_tracing("otelprof-demo-flask")

app = Flask(__name__)
app.wsgi_app = WSGIProfilingMiddleware(  # type: ignore[method-assign]
    app.wsgi_app,
    **demo_settings(),
)


@app.get("/cpu")
def cpu() -> Response:
    """CPU work in the request thread."""
    ms = min(float(request.args.get("ms", "30")), 2000.0)
    return jsonify(result=crunch_numbers(ms))


@app.get("/io")
def io() -> Response:
    """Waiting on I/O (a sleep stands in for a database call)."""
    ms = min(float(request.args.get("ms", "20")), 5000.0)
    time.sleep(ms / 1000.0)
    return jsonify(waited_ms=ms)


@app.get("/sync")
def sync_report() -> Response:
    """The same work as the FastAPI ``def`` endpoint (every Flask view is sync)."""
    rows = min(int(request.args.get("rows", "2000")), 200_000)
    return jsonify(digest=hash_report(rows))


@app.get("/items/<int:item_id>")
def item(item_id: int) -> Response:
    """A view that calls a settings loader first, like the FastAPI sync dependency."""
    settings = load_settings()
    return jsonify(item_id=item_id, region=settings["region"])


@app.get("/stream")
def stream() -> Response:
    """A streamed (generator) body: profiled until the server closes it."""
    chunks = min(int(request.args.get("chunks", "20")), 1000)

    def body() -> Iterator[str]:
        for index in range(chunks):
            yield render_chunk(index)

    return Response(body(), mimetype="text/plain")


@app.get("/fail")
def fail() -> Response:
    """A view that raises: Flask answers 500, the profile is kept."""
    crunch_numbers(5)
    raise DemoFailure("the demo view failed on purpose")
