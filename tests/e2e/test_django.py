"""End to end: the Django test project under uvicorn (ASGI) and gunicorn gthread (WSGI).

Real server processes on 127.0.0.1, spans exported by the real SDK
(``tests/django_app/asgi.py`` and ``wsgi.py`` configure it), profiles opened through
the links on those spans. Two in-process tests at the end cover the route's way into
the index when another span is current inside Django.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import django
import httpx
import pytest
from django.core.asgi import get_asgi_application
from django.core.wsgi import get_wsgi_application
from django.test import override_settings
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from werkzeug.test import Client

from otelprof_middleware import ProfilingMiddleware, WSGIProfilingMiddleware
from otelprof_middleware.stores import MemoryStore

from ..django_app import middleware
from ..helpers import free_port, http_scope, make_provider
from .servers import Server, fetch_profile, gunicorn, request_path, run_server, uvicorn
from .test_servers import _linked_spans

pytestmark = pytest.mark.e2e

PROFILE_URL = "otelprof.profile.url"
# path -> (route template, a function its profile must show)
PATHS = {
    "/items/7/": ("/items/<int:item_id>/", "django_sync_marker"),
    "/async/items/8/": ("/async/items/<int:item_id>/", "django_async_marker"),
}
ROUNDS = 3


@pytest.fixture
def asgi_server(tmp_path: Path) -> Iterator[Server]:
    port = free_port()
    with run_server(uvicorn("tests.django_app.asgi:application", port), tmp_path, port=port) as s:
        yield s


@pytest.fixture
def wsgi_server(tmp_path: Path) -> Iterator[Server]:
    port = free_port()
    command = gunicorn("tests.django_app.wsgi:application", port, workers=2, threads=4)
    with run_server(command, tmp_path, port=port) as s:
        yield s


def _check(server: Server) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        for _ in range(ROUNDS):
            for path in PATHS:
                response = client.get(path)
                assert response.status_code == 200, response.text
        assert client.get("/no/such/page/").status_code == 404
    linked = _linked_spans(server, ROUNDS * len(PATHS) + 1)
    assert len(linked) == ROUNDS * len(PATHS) + 1
    seen: set[str] = set()
    for span in linked:
        attributes = span["attributes"]
        path = request_path(span)
        url = attributes[PROFILE_URL]
        span_id = span["context"]["span_id"].removeprefix("0x")
        assert url.startswith(server.base_url) and url.endswith(f"?span_id={span_id}")
        response = fetch_profile(url)
        assert response.status_code == 200, (url, response.text)
        if path not in PATHS:  # the 404: profiled too, but no route matched
            assert "http.route" not in attributes
            continue
        route, function = PATHS[path]
        # RouteMiddleware put Django's pattern on the server span.
        assert attributes["http.route"] == route
        assert function in response.text, (path, response.text)
        seen.add(path)
    assert seen == set(PATHS)
    index = httpx.get(server.base_url + "/debug/profile?format=json&limit=1000").json()
    routes = [row["route"] for row in index["profiles"]]
    assert {route for route, _ in PATHS.values()} <= set(routes)
    assert routes.count("") == 1  # the 404


def test_django_asgi_under_uvicorn(asgi_server: Server) -> None:
    _check(asgi_server)


def test_django_wsgi_under_gunicorn_gthread(wsgi_server: Server) -> None:
    _check(wsgi_server)


def _instrumented_requests(server: Server) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        for _ in range(ROUNDS):
            for path in PATHS:
                assert client.get(path).status_code == 200
            assert client.get("/health/").status_code == 200


def _check_profiles(linked: list[dict[str, object]]) -> None:
    for span in linked:
        attributes: Any = span["attributes"]
        path = request_path(span)
        function = PATHS[path][1]
        response = fetch_profile(attributes[PROFILE_URL])
        assert response.status_code == 200 and function in response.text, path


def test_django_instrumentor_span_is_joined_under_wsgi(tmp_path: Path) -> None:
    """WSGI: DjangoInstrumentor's span stays the server span (not demoted to INTERNAL
    under one of ours), carries the profile link, and its excluded URLs get no span."""
    port = free_port()
    app = "tests.django_app.instrumented_wsgi:application"
    env = {"OTEL_PYTHON_DJANGO_EXCLUDED_URLS": "health"}
    command = gunicorn(app, port, workers=2, threads=4)
    with run_server(command, tmp_path, port=port, env=env) as server:
        _instrumented_requests(server)
        linked = _linked_spans(server, ROUNDS * len(PATHS))
        time.sleep(0.5)  # (a span of /health/ would have been written by now too)
        spans = server.spans()
        assert {span["kind"] for span in spans} == {"SpanKind.SERVER"}, spans
        assert len(spans) == len(linked) == ROUNDS * len(PATHS)  # none for /health/
        for span in linked:  # Django's names: its pattern, without the leading slash
            assert span["name"] in {f"GET {r.lstrip('/')}" for r, _ in PATHS.values()}
        _check_profiles(linked)
        index = httpx.get(server.base_url + "/debug/profile?format=json&limit=1000").json()
        assert {row["route"] for row in index["profiles"]} == {r for r, _ in PATHS.values()}


def test_django_instrumentor_under_asgi_keeps_our_span(tmp_path: Path) -> None:
    """ASGI (as documented): the middleware opens the server span, Django's is its INTERNAL
    child, the sync view's work is in the profile, and the instrumentor's exclusions
    must be repeated in ``exclude_paths``."""
    port = free_port()
    app = "tests.django_app.instrumented_asgi:application"
    env = {"OTEL_PYTHON_DJANGO_EXCLUDED_URLS": "health", "OTELPROF_EXCLUDE_PATHS": "/health"}
    with run_server(uvicorn(app, port), tmp_path, port=port, env=env) as server:
        _instrumented_requests(server)
        linked = _linked_spans(server, ROUNDS * len(PATHS))
        time.sleep(0.5)
        spans = server.spans()
        kinds = sorted(span["kind"] for span in spans)
        assert kinds == ["SpanKind.INTERNAL"] * 6 + ["SpanKind.SERVER"] * 6, kinds
        assert len(linked) == ROUNDS * len(PATHS)
        _check_profiles(linked)


@pytest.mark.parametrize(
    "server_kind",
    ["asgi-instrumentor", "wsgi"],
)
def test_django_always_on_profiles_async_views(tmp_path: Path, server_kind: str) -> None:
    """Always-on mode (the default), where Django hands an async view back and forth:

    * ASGI with DjangoInstrumentor, whose middleware is sync only: Django runs the chain on
      a worker thread, which runs the view back on the loop (``async_to_sync``) and waits;
    * WSGI: ``async_to_sync`` runs the view on a new loop in a worker thread while the
      request's thread waits.

    The view's work is in the profile, not the wait."""
    port = free_port()
    env = {
        "OTELPROF_EXCLUDE_PATHS": "/health",
        "OTELPROF_MODE": "always_on",
        "OTELPROF_ALWAYS_ON_INTERVAL_MS": "2",
    }
    if server_kind == "wsgi":
        command = gunicorn("tests.django_app.wsgi:application", port, workers=2, threads=4)
    else:
        command = uvicorn("tests.django_app.instrumented_asgi:application", port)
    with run_server(command, tmp_path, port=port, env=env) as server:
        _instrumented_requests(server)
        linked = _linked_spans(server, ROUNDS * len(PATHS))
        assert len(linked) == ROUNDS * len(PATHS)
        found: dict[str, int] = {}
        for span in linked:
            attributes: Any = span["attributes"]
            path = request_path(span)
            response = fetch_profile(attributes[PROFILE_URL])
            assert response.status_code == 200, path
            found[path] = found.get(path, 0) + (PATHS[path][1] in response.text)
        # Statistical: a 20 ms marker has a few ticks, and a tick of the watchdog thread
        # (a loop starved of CPU) cannot tell whose asgiref task runs.
        assert all(count >= ROUNDS - 1 for count in found.values()), found


def test_requests_after_a_large_upload_on_one_connection_get_their_own_spans(
    tmp_path: Path,
) -> None:
    """uvicorn on an asyncio loop resumes reading a connection from inside the request
    that paused it (a body larger than its buffer): the next requests on that connection
    start in that request's context, with its ended server span current (CPython
    gh-140947). They still get their own server span, in their own trace, and a profile."""
    port = free_port()
    command = [*uvicorn("tests.django_app.asgi:application", port, workers=1), "--loop", "asyncio"]
    with run_server(command, tmp_path, port=port) as server:
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            assert client.post("/health/", content=b"x" * 2_000_000).status_code == 200
            for path in PATHS:
                assert client.get(path).status_code == 200
        linked = _linked_spans(server, 1 + len(PATHS))
        by_path = {request_path(span): span for span in linked}
        assert set(by_path) >= {"/health/", *PATHS}, sorted(by_path)
        traces = {span["context"]["trace_id"] for span in by_path.values()}
        assert len(traces) == len(by_path)
        assert all(span["parent_id"] is None for span in by_path.values())
        _check_profiles([by_path[path] for path in PATHS])


# In-process: the route must reach the profile index even when the span current inside
# Django is not the server span (DjangoInstrumentor's, here a stand-in), through the
# ASGI scope / WSGI environ key that RouteMiddleware fills.

ROUTE_FIRST = [
    "tests.django_app.middleware.ChildSpanMiddleware",
    "otelprof_middleware.django.RouteMiddleware",
]


@pytest.fixture
def django_with_child_span() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.django_app.settings")
    django.setup()
    provider, spans = make_provider()
    middleware.PROVIDER = provider
    try:
        with override_settings(MIDDLEWARE=ROUTE_FIRST):
            yield provider, spans
    finally:
        middleware.PROVIDER = None


def _route_checks(spans: InMemorySpanExporter, store: MemoryStore) -> None:
    by_kind = {s.kind: s for s in spans.get_finished_spans()}
    server, child = by_kind[SpanKind.SERVER], by_kind[SpanKind.INTERNAL]
    assert child.parent is not None and child.parent.span_id == server.context.span_id
    assert (child.attributes or {}).get("http.route") == "/items/<int:item_id>/"
    # The server span is ours: named by the pattern read from the scope / environ (it is
    # opened before Django routes, with the raw path), whichever span was current then.
    assert (server.attributes or {}).get("http.route") == "/items/<int:item_id>/"
    assert server.name == "GET /items/<int:item_id>/"
    assert PROFILE_URL in (server.attributes or {})
    [summary] = store.list()
    assert summary.route == "/items/<int:item_id>/"  # read from the scope / environ


def test_asgi_route_reaches_the_index_through_the_scope(
    django_with_child_span: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, spans = django_with_child_span
    store = MemoryStore()
    app = ProfilingMiddleware(
        get_asgi_application(), tracer_provider=provider, profile_store=store, sample_rate=1.0
    )

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            return await client.get("/items/3/")

    response = anyio.run(call)
    assert response.json() == {"item_id": 3, "view": "sync"}
    app.core.writer.flush(5)
    _route_checks(spans, store)


def test_wsgi_route_reaches_the_index_through_the_environ(
    django_with_child_span: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, spans = django_with_child_span
    store = MemoryStore()
    app = WSGIProfilingMiddleware(
        get_wsgi_application(), tracer_provider=provider, profile_store=store, sample_rate=1.0
    )
    response = Client(app).get("/items/3/", environ_base={"REMOTE_ADDR": "127.0.0.1"})
    assert response.get_json() == {"item_id": 3, "view": "sync"}
    app.core.writer.flush(5)
    _route_checks(spans, store)


def test_a_request_django_cancels_keeps_its_route(
    django_with_child_span: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """Django (ASGI) cancels a view whose client went away: the span and the profile still
    get the route, the slow request someone looks for."""
    provider, spans = django_with_child_span
    store = MemoryStore()
    app = ProfilingMiddleware(
        get_asgi_application(), tracer_provider=provider, profile_store=store, sample_rate=1.0
    )
    scope = http_scope(
        "/slow/",
        headers=[(b"host", b"localhost")],
        client=("127.0.0.1", 50000),
        server=("localhost", 80),
    )
    messages = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await anyio.sleep(0.1)  # then the client leaves
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        raise AssertionError(f"a cancelled view sent {message}")

    async def call() -> None:
        with anyio.fail_after(3):
            await app(scope, receive, send)

    anyio.run(call)
    app.core.writer.flush(5)
    [server] = [span for span in spans.get_finished_spans() if span.kind == SpanKind.SERVER]
    assert server.name == "GET /slow/"
    assert (server.attributes or {}).get("http.route") == "/slow/"
    [summary] = store.list()
    assert summary.route == "/slow/"
