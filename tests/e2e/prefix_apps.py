"""Apps served below the path prefix ``/svc`` (``tests/e2e/test_prefix.py``).

Each has the same two routes, ``/items/{item_id}`` (some CPU work in a marker function)
and ``/health``, so the tests can ask every set-up the same questions. Spans go through
the real SDK to ``$OTELPROF_DEMO_SPANS_DIR`` (``demo_app.telemetry``).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI
from flask import Flask, Response, jsonify
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Mount, Route

from demo_app.telemetry import configure_tracing
from otelprof_middleware import ProfilingMiddleware, WSGIProfilingMiddleware

configure_tracing("otelprof-e2e-prefix")

PREFIX = "/svc"
SETTINGS: dict[str, Any] = {"debug_route": True, "exclude_paths": "/health"}


def marker_prefix_work() -> int:
    """A few milliseconds of CPU work under a name the profile must show."""
    end = time.perf_counter() + 0.003
    total = 0
    while time.perf_counter() < end:
        total += sum(range(50))
    return total


def _fastapi(**options: Any) -> FastAPI:
    app = FastAPI(**options)
    app.add_middleware(ProfilingMiddleware, **SETTINGS)

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        marker_prefix_work()
        return {"item_id": item_id}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


# FastAPI(root_path=...): the prefix a stripping proxy removed, told to the app itself.
fastapi_root_path = _fastapi(root_path=PREFIX)
# No prefix of its own: behind nginx, `uvicorn --root-path /svc` tells it.
fastapi_plain = _fastapi()


async def _item(request: Request) -> JSONResponse:
    marker_prefix_work()
    return JSONResponse({"item_id": request.path_params["item_id"]})


async def _health(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def _inner() -> Starlette:
    return Starlette(routes=[Route("/items/{item_id:int}", _item), Route("/health", _health)])


# A Starlette Mount, the middleware on the mounted (inner) app: its root is /svc.
mount_inner = Starlette(routes=[Mount(PREFIX, app=ProfilingMiddleware(_inner(), **SETTINGS))])

# The same Mount with the middleware on the outer app: its root is /, and /svc is part
# of its own routes (so its exclude_paths name /svc/health).
mount_outer = ProfilingMiddleware(
    Starlette(routes=[Mount(PREFIX, app=_inner())]),
    debug_route=True,
    exclude_paths=PREFIX + "/health",
)

# Flask, for gunicorn with SCRIPT_NAME=/svc.
flask_app = Flask(__name__)
flask_app.wsgi_app = WSGIProfilingMiddleware(  # type: ignore[method-assign]
    flask_app.wsgi_app, **SETTINGS
)


@flask_app.get("/items/<int:item_id>")
def flask_item(item_id: int) -> Response:
    marker_prefix_work()
    return jsonify(item_id=item_id)


@flask_app.get("/health")
def flask_health() -> Response:
    return jsonify(status="ok")
