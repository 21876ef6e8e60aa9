"""Route names under Starlette before 1.0, whose router leaves only the matched
``endpoint`` in the scope (1.0 added ``scope["route"]``, which the adapter reads).

FastAPI sets ``route`` itself for its own routes, but a plain Starlette app on 0.x (the
0.40-0.52 that ``starlette>=0.40`` allows, FastAPI 0.115's 0.46 among them) got every
server span named ``GET`` and every profile an empty route (one keep-policy baseline
for the whole app), and a FastAPI app's ``StaticFiles`` mount was ``GET`` too. The
scopes here have ``route`` taken out as the response starts, as 0.x leaves them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.testclient import TestClient

from otelprof_middleware import ProfilingMiddleware
from otelprof_middleware._types import Message, Receive, Scope, Send
from otelprof_middleware.stores import MemoryStore

from .helpers import make_provider, server_spans


def _text(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


class _AsStarlette0x:
    """The app, with its scope as Starlette 0.x leaves it: no ``route``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def sending(message: Message) -> None:
            scope.pop("route", None)
            await send(message)

        await self.app(scope, receive, sending)


@pytest.mark.parametrize("starlette_0x", [True, False], ids=["0.x", "1.x"])
def test_routes_name_spans_and_profiles(tmp_path: Path, starlette_0x: bool) -> None:
    (tmp_path / "a.txt").write_text("static")
    inner = Starlette(routes=[Route("/hello/{name}", _text)])
    app: Any = Starlette(
        routes=[
            Route("/items/{item_id:int}", _text),
            Route("/other/{item_id:int}", _text),  # the same endpoint as /items
            Mount("/sub", app=inner),
            Mount("/static", app=StaticFiles(directory=tmp_path)),
        ]
    )
    if starlette_0x:
        app = _AsStarlette0x(app)
    provider, exporter = make_provider()
    store = MemoryStore()
    middleware = ProfilingMiddleware(
        app, tracer_provider=provider, profile_store=store, sample_rate=1.0, min_duration_ms=0
    )
    try:
        with TestClient(middleware) as client:
            for path in ("/items/1", "/other/2", "/sub/hello/x", "/static/a.txt", "/nothere"):
                client.get(path)
        assert middleware.core.writer.flush(10)
        names = sorted(span.name for span in server_spans(exporter))
        assert names == [
            "GET",  # matched nothing
            "GET /items/{item_id}",
            "GET /other/{item_id}",
            "GET /static",
            "GET /sub/hello/{name}",
        ]
        routes = sorted(summary.route or "" for summary in store.list())
        assert routes == [
            "",
            "/items/{item_id:int}",
            "/other/{item_id:int}",
            "/static",
            "/sub/hello/{name}",
        ]
    finally:
        middleware.core.writer.close()
