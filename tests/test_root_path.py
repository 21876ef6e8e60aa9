"""Behind a path prefix: the viewer, exclude_paths, links and the index JSON all work.

ASGI servers and frameworks disagree on whether ``path`` includes ``root_path`` (uvicorn
``--root-path`` and ``FastAPI(root_path=...)`` keep it, older set-ups strip it): both are
tested. WSGI's ``SCRIPT_NAME`` is the prefix and ``PATH_INFO`` is always below it.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from werkzeug.exceptions import NotFound
from werkzeug.middleware.dispatcher import DispatcherMiddleware

from otelprof_middleware import ProfilingMiddleware, WSGIProfilingMiddleware
from otelprof_middleware.stores import MemoryStore

from .helpers import drive, http_scope, make_provider, marker_alpha, server_spans

PREFIX = "/svc"


def _item(request: Request) -> PlainTextResponse:
    marker_alpha(0.002)
    return PlainTextResponse("item")


# Both adapters: every request kept, the viewer on, /health never profiled.
SETTINGS: dict[str, Any] = {
    "sample_rate": 1.0,
    "min_duration_ms": 0,
    "debug_route": True,
    "exclude_paths": "/health",
}


def _middleware(**settings: Any) -> tuple[ProfilingMiddleware, Any]:
    provider, exporter = make_provider()
    app = Starlette(routes=[Route("/items/{n}", _item), Route("/health", _item)])
    middleware = ProfilingMiddleware(
        app, tracer_provider=provider, profile_store=MemoryStore(), **SETTINGS, **settings
    )
    return middleware, exporter


async def _get(app: Any, path: str, *, full_path: bool) -> httpx.Response:
    """GET ``path`` (below the prefix) the way a server with ``root_path`` sends it."""
    scope = http_scope(
        (PREFIX + path) if full_path else path,
        raw_path=(PREFIX + path).encode(),
        root_path=PREFIX,
        query_string=b"format=json" if path.startswith("/debug") else b"",
        headers=[(b"host", b"example.test")],
        server=("example.test", 80),
    )
    sent = await drive(app, scope)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return httpx.Response(start["status"], content=body)


@pytest.mark.anyio
@pytest.mark.parametrize("full_path", [True, False], ids=["path_has_prefix", "path_below"])
async def test_asgi_root_path(full_path: bool) -> None:
    middleware, exporter = _middleware()
    assert (await _get(middleware, "/items/1", full_path=full_path)).text == "item"
    assert (await _get(middleware, "/health", full_path=full_path)).text == "item"
    middleware.core.writer.flush(5)
    index = await _get(middleware, "/debug/profile", full_path=full_path)
    assert index.status_code == 200, index.text
    [row] = index.json()["profiles"]  # /health is excluded below the prefix too
    assert row["url"].startswith(f"http://example.test{PREFIX}/debug/profile/")
    linked = [s for s in server_spans(exporter) if "otelprof.profile.url" in (s.attributes or {})]
    [span] = linked
    assert (span.attributes or {})["otelprof.profile.url"] == row["url"]
    # The viewer's own pages are never profiled, below the prefix as anywhere.
    assert len(middleware.core.get_store().list()) == 1


def test_wsgi_script_name() -> None:
    provider, exporter = make_provider()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        marker_alpha(0.002)
        start_response("200 OK", [("content-type", "text/plain")])
        return [b"item"]

    middleware = WSGIProfilingMiddleware(
        app, tracer_provider=provider, profile_store=MemoryStore(), **SETTINGS
    )
    # As gunicorn with SCRIPT_NAME=/svc presents /svc/items/1 (httpx's transport sets
    # SCRIPT_NAME and leaves PATH_INFO as given, so the paths here are below the prefix).
    transport = httpx.WSGITransport(app=middleware, script_name=PREFIX)
    with httpx.Client(transport=transport, base_url="http://example.test") as client:
        assert client.get("/items/1").text == "item"
        assert client.get("/health").text == "item"
        middleware.core.writer.flush(5)
        index = client.get("/debug/profile", params={"format": "json"})
    assert index.status_code == 200, index.text
    [row] = index.json()["profiles"]
    assert row["url"].startswith(f"http://example.test{PREFIX}/debug/profile/")
    [span] = server_spans(exporter)
    assert (span.attributes or {})["otelprof.profile.url"] == row["url"]


@pytest.mark.anyio
async def test_asgi_mount_inside_the_app_keeps_links_at_the_middlewares_root() -> None:
    """Starlette's Mount rewrites the scope's ``root_path`` in place as it routes: the
    link is still made from the root the middleware was called with, and the index
    shows the route with the mount's prefix (as the app's own routes are spelt)."""
    provider, exporter = make_provider()
    inner = Starlette(routes=[Route("/items/{n:int}", _item)])
    middleware = ProfilingMiddleware(
        Starlette(routes=[Mount(PREFIX, app=inner)]),
        tracer_provider=provider,
        profile_store=MemoryStore(),
        sample_rate=1.0,
        min_duration_ms=0,
        debug_route=True,
    )
    transport = httpx.ASGITransport(app=middleware)  # client 127.0.0.1: the viewer answers
    async with httpx.AsyncClient(transport=transport, base_url="http://example.test") as client:
        assert (await client.get(PREFIX + "/items/1")).text == "item"
        middleware.core.writer.flush(5)
        index = await client.get("/debug/profile", params={"format": "json"})
        [row] = index.json()["profiles"]
        assert row["route"] == PREFIX + "/items/{n:int}"
        assert row["url"].startswith("http://example.test/debug/profile/")
        [span] = server_spans(exporter)
        assert (span.attributes or {})["otelprof.profile.url"] == row["url"]
        assert (await client.get(row["url"] + "&format=text")).status_code == 200


def test_wsgi_dispatcher_inside_the_app_keeps_links_at_the_middlewares_root() -> None:
    """werkzeug's DispatcherMiddleware moves the prefix into the environ's SCRIPT_NAME
    as it dispatches: the link is still made from the middleware's own SCRIPT_NAME."""
    provider, exporter = make_provider()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("content-type", "text/plain")])
        return [b"item"]

    middleware = WSGIProfilingMiddleware(
        DispatcherMiddleware(NotFound(), {PREFIX: app}),
        tracer_provider=provider,
        profile_store=MemoryStore(),
        sample_rate=1.0,
        min_duration_ms=0,
        debug_route=True,
    )
    transport = httpx.WSGITransport(app=middleware)
    with httpx.Client(transport=transport, base_url="http://example.test") as client:
        assert client.get(PREFIX + "/items/1").text == "item"
        middleware.core.writer.flush(5)
        [row] = client.get("/debug/profile", params={"format": "json"}).json()["profiles"]
        assert row["url"].startswith("http://example.test/debug/profile/")
        [span] = server_spans(exporter)
        assert (span.attributes or {})["otelprof.profile.url"] == row["url"]
        assert client.get(row["url"] + "&format=text").status_code == 200


@pytest.mark.parametrize("outer_root", ["", "/outer"])
def test_wsgi_dispatcher_inside_the_app_keeps_the_mount_point_in_the_route(
    outer_root: str,
) -> None:
    """A Flask app mounted by a DispatcherMiddleware inside the middleware: its URL rule
    is relative to the mount point, which the route (index and span name) puts back in
    front, as for a Starlette Mount. Two mounted apps with the same rule stay two routes;
    a SCRIPT_NAME the server gave the whole app stays out of it."""
    from flask import Flask

    provider, exporter = make_provider()
    apps = {}
    for name in ("/v1", "/v2"):
        app = Flask(name.strip("/"))
        app.add_url_rule("/items/<int:item_id>", "item", lambda item_id: {"id": item_id})
        apps[name] = app
    middleware = WSGIProfilingMiddleware(
        DispatcherMiddleware(NotFound(), apps),
        tracer_provider=provider,
        profile_store=MemoryStore(),
        sample_rate=1.0,
        min_duration_ms=0,
        debug_route=True,
    )
    transport = httpx.WSGITransport(app=middleware, script_name=outer_root)
    with httpx.Client(transport=transport, base_url="http://example.test") as client:
        assert client.get("/v1/items/1").json() == {"id": 1}
        assert client.get("/v2/items/2").json() == {"id": 2}
        middleware.core.writer.flush(5)
        rows = client.get("/debug/profile", params={"format": "json"}).json()["profiles"]
    assert sorted(row["route"] for row in rows) == [
        "/v1/items/<int:item_id>",
        "/v2/items/<int:item_id>",
    ]
    assert sorted(span.name for span in server_spans(exporter)) == [
        "GET /v1/items/<int:item_id>",
        "GET /v2/items/<int:item_id>",
    ]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_a_mount_without_a_route_of_its_own_is_named_by_its_mount_point() -> None:
    """A request a Mount matched but its app did not route (a 404 inside it, a mounted
    app that sets no route): the mount point, not the mount's path twice."""
    from otelprof_middleware.asgi import route_template

    mount = Mount("/v1", app=Starlette())
    scope: dict[str, Any] = {"route": mount, "root_path": "/v1"}
    assert route_template(scope, for_span=True) == "/v1"
    assert route_template(scope) == "/v1"
    # Under the middleware's own root path, the index shows the part below it.
    scope = {"route": mount, "root_path": "/api/v1"}
    assert route_template(scope, for_span=True) == "/api/v1"
    assert route_template(scope, root_path="/api") == "/v1"
    assert route_template({"route": Mount("/", app=Starlette()), "root_path": ""}) == "/"
    # An ordinary route keeps its template under the mount.
    route = Route("/items/{item_id:int}", endpoint=lambda request: None)
    scope = {"route": route, "root_path": "/v1"}
    assert route_template(scope, for_span=True) == "/v1/items/{item_id}"
    assert route_template(scope) == "/v1/items/{item_id:int}"
