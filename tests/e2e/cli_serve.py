"""``python -m tests.e2e.cli_serve PORT``: a ``serve`` command that runs uvicorn inside a
span of its own, as a click command does under opentelemetry-instrumentation-click (which
opens a span for every command but ``uvicorn`` and ``flask run``; ``granian`` too). The
span is current in every request's task."""

from __future__ import annotations

import sys

import uvicorn
from opentelemetry import trace

from .litestar_app import app

if __name__ == "__main__":
    with trace.get_tracer("cli").start_as_current_span("serve"):
        uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=False)
