"""One SERVER span per request, whatever telemetry the app already has, wherever we sit.

For each source of server spans, with our middleware outside and inside it: exactly one
SERVER span per request, owned by the layer the user configured (its name and
exclusions), our profile link on it when profiled, and none of our spans for URLs that
layer excludes. Real OTel SDK providers with in-memory exporters.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI
from litestar import Request as LitestarRequest
from opentelemetry import trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware as OTelASGI
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.opentelemetry import OpenTelemetryMiddleware as StarletteOTel
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Mount, Route

from otelprof_middleware import ProfilingMiddleware
from otelprof_middleware.profiling._span import PROFILE_URL, route_attribute
from otelprof_middleware.stores import MemoryStore

from .helpers import make_provider, marker_alpha, marker_beta, server_spans, text_of

Otel = tuple[TracerProvider, InMemorySpanExporter]


def ours(otel: Otel) -> dict[str, Any]:
    return {
        "tracer_provider": otel[0],
        "profile_store": MemoryStore(),
        "sample_rate": 1.0,
        "min_duration_ms": 0,
    }


def item(request: Request) -> PlainTextResponse:
    marker_alpha(0.002)
    return PlainTextResponse(f"item {request.path_params['item_id']}")


def health(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


ROUTES = [Route("/items/{item_id:int}", item), Route("/health", health)]


def fastapi_app(**telemetry: Any) -> FastAPI:
    app = FastAPI(telemetry=telemetry or None)

    @app.get("/items/{item_id}")
    def get_item(item_id: int) -> dict[str, int]:
        marker_alpha(0.002)
        return {"item": item_id}

    @app.get("/health")
    def get_health() -> str:
        return "ok"

    return app


def send(app: Any, *paths: str) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)

    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            return [await c.get(path) for path in paths]

    return anyio.run(go)


def check_one_linked_span_per_request(
    exporter: InMemorySpanExporter, paths: list[str], *, name: str | None = None
) -> None:
    spans = server_spans(exporter)
    assert len(spans) == len(paths), [(s.name, s.instrumentation_scope) for s in spans]
    for span in spans:
        assert (span.attributes or {}).get(PROFILE_URL), span.name
        if name is not None:
            assert span.name == name


PATHS = ["/items/1", "/items/2", "/items/3"]


# --- OpenTelemetry's ASGI middleware ---------------------------------------------------


def test_otel_asgi_outside_ours(otel: Otel) -> None:
    app = OTelASGI(
        ProfilingMiddleware(Starlette(routes=ROUTES), **ours(otel)), tracer_provider=otel[0]
    )
    assert [r.status_code for r in send(app, *PATHS)] == [200, 200, 200]
    check_one_linked_span_per_request(otel[1], PATHS)


def test_otel_asgi_inside_ours_owns_the_span(otel: Otel) -> None:
    inner = OTelASGI(Starlette(routes=ROUTES), tracer_provider=otel[0])
    app = ProfilingMiddleware(inner, **ours(otel))
    assert [r.text for r in send(app, *PATHS)] == ["item 1", "item 2", "item 3"]
    check_one_linked_span_per_request(otel[1], PATHS)
    spans = server_spans(otel[1])
    assert {s.instrumentation_scope.name for s in spans if s.instrumentation_scope} == {
        "opentelemetry.instrumentation.asgi"
    }


# --- Starlette's own OpenTelemetryMiddleware ---------------------------------------------


@pytest.mark.parametrize("position", ["ours_outside", "ours_inside"])
def test_starlette_native_middleware(otel: Otel, position: str) -> None:
    native = Middleware(StarletteOTel, tracer_provider=otel[0], excluded_urls=["/health"])
    if position == "ours_inside":
        app = Starlette(
            routes=ROUTES, middleware=[native, Middleware(ProfilingMiddleware, **ours(otel))]
        )
    else:
        app = Starlette(routes=ROUTES, middleware=[native])
        app.add_middleware(ProfilingMiddleware, **ours(otel))  # outermost of the user's
    responses = send(app, *PATHS, "/health", "/health")
    assert [r.status_code for r in responses] == [200] * 5
    # Its span (named by route), linked; nothing at all for the URL it excludes.
    check_one_linked_span_per_request(otel[1], PATHS, name="GET /items/{item_id}")


def test_starlette_native_middleware_wrapped_from_outside(otel: Otel) -> None:
    native = Middleware(StarletteOTel, tracer_provider=otel[0], excluded_urls=["/health"])
    app = ProfilingMiddleware(Starlette(routes=ROUTES, middleware=[native]), **ours(otel))
    send(app, *PATHS, "/health")
    check_one_linked_span_per_request(otel[1], PATHS, name="GET /items/{item_id}")


# --- FastAPI's native telemetry and FastAPIInstrumentor ------------------------------


@pytest.mark.parametrize("position", ["add_middleware", "wrapped"])
def test_fastapi_native_telemetry_on(otel: Otel, position: str) -> None:
    app: Any = fastapi_app(tracer_provider=otel[0], metrics=False, logs=False)
    if position == "add_middleware":
        app.add_middleware(ProfilingMiddleware, **ours(otel))
    else:
        app = ProfilingMiddleware(app, **ours(otel))
    assert [r.json() for r in send(app, *PATHS)] == [{"item": 1}, {"item": 2}, {"item": 3}]
    check_one_linked_span_per_request(otel[1], PATHS, name="GET /items/{item_id}")


@pytest.mark.parametrize(
    "telemetry",
    [
        {"tracing": False, "metrics": False, "logs": False},
        {"tracing": False, "metrics": False},  # logs only (no logger provider: a no-op)
        {"tracing": False},
    ],
    ids=["all_off", "logs_only", "tracing_off"],
)
@pytest.mark.parametrize("position", ["add_middleware", "wrapped"])
def test_fastapi_native_tracing_off_means_no_span(
    otel: Otel, telemetry: dict[str, Any], position: str
) -> None:
    app: Any = fastapi_app(tracer_provider=otel[0], **telemetry)
    if position == "add_middleware":
        app.add_middleware(ProfilingMiddleware, **ours(otel))
    else:
        app = ProfilingMiddleware(app, **ours(otel))
    assert [r.status_code for r in send(app, *PATHS)] == [200, 200, 200]
    assert server_spans(otel[1]) == []


def test_fastapi_native_exclude_respected(otel: Otel) -> None:
    app = fastapi_app(
        tracer_provider=otel[0],
        metrics=False,
        logs=False,
        exclude=lambda scope: scope.get("path") == "/health",
    )
    app.add_middleware(ProfilingMiddleware, **ours(otel))
    send(app, *PATHS, "/health")
    check_one_linked_span_per_request(otel[1], PATHS, name="GET /items/{item_id}")


@pytest.mark.parametrize("position", ["add_middleware", "wrapped"])
def test_fastapi_instrumentor(otel: Otel, position: str) -> None:
    app: Any = fastapi_app(tracer_provider=otel[0], metrics=False, logs=False)
    FastAPIInstrumentor.instrument_app(app, tracer_provider=otel[0])
    try:
        if position == "add_middleware":
            app.add_middleware(ProfilingMiddleware, **ours(otel))
        else:
            app = ProfilingMiddleware(app, **ours(otel))
        send(app, *PATHS)
        check_one_linked_span_per_request(otel[1], PATHS, name="GET /items/{item_id}")
    finally:
        FastAPIInstrumentor.uninstrument_app(app if position == "add_middleware" else app.app)


# --- our own span, when nothing else opens one ---------------------------------------


def test_no_telemetry_we_open_the_only_span(otel: Otel) -> None:
    app = ProfilingMiddleware(Starlette(routes=ROUTES), **ours(otel))
    send(app, *PATHS, "/missing")
    # Named by route as soon as it is known (not one name per id); unmatched: by method.
    check_one_linked_span_per_request(otel[1], [*PATHS, "/missing"])
    names = sorted(span.name for span in server_spans(otel[1]))
    assert names == ["GET", *["GET /items/{item_id}"] * 3], names
    routes = {(span.attributes or {}).get("http.route") for span in server_spans(otel[1])}
    assert routes == {"/items/{item_id}", None}


@pytest.mark.parametrize("telemetry", ["none", "fastapi_instrumentor"])
def test_a_span_current_around_the_whole_server_is_not_joined(otel: Otel, telemetry: str) -> None:
    """A span current while the server runs (``opentelemetry-instrument granian``: the click
    instrumentation's span for the ``granian`` command, inherited by the forked worker; or a
    ``serve`` CLI command calling ``uvicorn.run``) is current in every request's task. It is
    not a request's span: each request still gets its own span with its own link (inside
    the CLI span's trace, as OTel's ASGI middleware makes it), and the CLI span is neither
    renamed nor linked. Before, every request joined it: one profile, overwritten by each
    request, on a span the worker never ends nor exports."""
    store = MemoryStore()
    if telemetry == "none":
        app: Any = ProfilingMiddleware(
            Starlette(routes=ROUTES), **{**ours(otel), "profile_store": store}
        )
    else:
        app = fastapi_app(tracer_provider=otel[0], metrics=False, logs=False)
        FastAPIInstrumentor.instrument_app(app, tracer_provider=otel[0])
        app.add_middleware(ProfilingMiddleware, **{**ours(otel), "profile_store": store})
    try:
        with otel[0].get_tracer("click").start_as_current_span("granian") as cli:
            assert [r.status_code for r in send(app, *PATHS)] == [200, 200, 200]
    finally:
        if telemetry != "none":
            FastAPIInstrumentor.uninstrument_app(app)
    finished = otel[1].get_finished_spans()
    cli_span = next(s for s in finished if s.context.span_id == cli.get_span_context().span_id)
    assert cli_span.name == "granian"
    assert PROFILE_URL not in (cli_span.attributes or {})
    requests = [s for s in finished if (s.attributes or {}).get("http.route")]
    assert len(requests) == len(PATHS), [(s.name, s.kind) for s in finished]
    assert all((s.attributes or {}).get(PROFILE_URL) for s in requests)
    span_ids = {f"{s.context.span_id:016x}" for s in requests}
    assert len(span_ids) == len(PATHS)
    deadline = time.monotonic() + 5  # (the writer thread stores them)
    while len(store.list()) < len(PATHS) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert {r.span_id for r in store.list()} == span_ids


@pytest.mark.parametrize(
    ("variables", "excluded"),
    [
        ({"OTEL_PYTHON_EXCLUDED_URLS": "health"}, True),
        ({"OTEL_PYTHON_ASGI_EXCLUDED_URLS": "health,other"}, True),
        # the ASGI-specific variable wins over the generic one, as in OTel's instrumentors
        ({"OTEL_PYTHON_EXCLUDED_URLS": "health", "OTEL_PYTHON_ASGI_EXCLUDED_URLS": "x"}, False),
        ({}, False),
    ],
)
def test_the_span_we_open_honours_otels_excluded_urls(
    otel: Otel, monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], excluded: bool
) -> None:
    """With no instrumentation in the app (Litestar, Quart, Falcon under
    ``opentelemetry-instrument``), ours is the request's only span: the URLs OTel's
    instrumentations are told to leave out get none (and so no profile), as
    FastAPIInstrumentor and StarletteInstrumentor leave them out."""
    for name in ("OTEL_PYTHON_EXCLUDED_URLS", "OTEL_PYTHON_ASGI_EXCLUDED_URLS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    app = ProfilingMiddleware(Starlette(routes=ROUTES), **ours(otel))
    responses = send(app, "/items/1", "/health")
    assert [r.text for r in responses] == ["item 1", "ok"]
    targets = {(s.attributes or {}).get("http.target") for s in server_spans(otel[1])}
    assert targets == ({"/items/1"} if excluded else {"/items/1", "/health"})


def test_our_span_is_named_by_route_when_the_response_does_not_end_inside_us(
    otel: Otel,
) -> None:
    """A request whose last body never passes through us is named by its route all the
    same: a route that raises (Starlette's ``ServerErrorMiddleware``, outside the
    middlewares added to the app, sends the 500) and a stream its client left (Starlette's
    ``StreamingResponse`` returns mid-body). Was: named by the raw path, one span name per
    id, and no ``http.route``, on exactly the failed requests."""

    def boom(request: Request) -> PlainTextResponse:
        raise RuntimeError("on purpose")

    async def chunks() -> Any:
        while True:
            yield b"chunk"
            await anyio.sleep(0.001)

    def stream(request: Request) -> StreamingResponse:
        return StreamingResponse(chunks())

    app = Starlette(
        routes=[Route("/boom/{n:int}", boom), Route("/stream/{n:int}", stream)],
        middleware=[Middleware(ProfilingMiddleware, **ours(otel))],
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)

    async def go() -> None:
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            assert (await c.get("/boom/7")).status_code == 500
        messages = iter([{"type": "http.request", "body": b""}, {"type": "http.disconnect"}])

        async def receive() -> dict[str, Any]:
            message = next(messages, None)
            if message is None:
                await anyio.sleep_forever()
            return message  # type: ignore[return-value]

        async def send(message: dict[str, Any]) -> None:
            await anyio.sleep(0)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/stream/8",
            "raw_path": b"/stream/8",
            "root_path": "",
            "query_string": b"",
            "headers": [(b"host", b"testserver")],
            "client": ("127.0.0.1", 5000),
            "server": ("testserver", 80),
        }
        await app(scope, receive, send)

    anyio.run(go)
    spans = {span.name: span for span in server_spans(otel[1])}
    assert sorted(spans) == ["GET /boom/{n}", "GET /stream/{n}"], sorted(spans)
    assert spans["GET /boom/{n}"].attributes["http.route"] == "/boom/{n}"  # type: ignore[index]
    assert spans["GET /stream/{n}"].attributes["http.route"] == "/stream/{n}"  # type: ignore[index]


# --- span owners in mounted apps: known per request, once the route is matched ---------


def scopes_of(spans: list[Any]) -> list[str]:
    return [s.instrumentation_scope.name if s.instrumentation_scope else "" for s in spans]


@pytest.mark.parametrize("position", ["add_middleware", "wrapped"])
def test_a_mounted_fastapi_app_owns_the_span_of_its_requests(otel: Otel, position: str) -> None:
    api = fastapi_app(tracer_provider=otel[0], metrics=False, logs=False)
    outer: Any = Starlette(routes=[Route("/health", health), Mount("/api", app=api)])
    if position == "add_middleware":
        outer.add_middleware(ProfilingMiddleware, **ours(otel))
    else:
        outer = ProfilingMiddleware(outer, **ours(otel))
    paths = ["/api/items/1", "/health", "/api/items/2", "/missing"]
    responses = send(outer, *paths)
    assert [r.status_code for r in responses] == [200, 200, 200, 404]
    spans = server_spans(otel[1])
    assert len(spans) == len(paths), [(s.name, scopes_of([s])) for s in spans]
    assert all((s.attributes or {}).get(PROFILE_URL) for s in spans)
    # FastAPI's for its routes (in the trace with its endpoint spans), ours elsewhere.
    fastapi_spans = [s for s in spans if s.name.endswith("/items/{item_id}")]
    assert len(fastapi_spans) == 2
    assert {scopes_of([s])[0] for s in fastapi_spans} != {"otelprof_middleware"}
    ours_spans = [s for s in spans if s not in fastapi_spans]
    assert sorted(s.name for s in ours_spans) == ["GET", "GET /health"]
    # Every span of FastAPI's trace is under its server span: one trace per request.
    for server in fastapi_spans:
        assert server.context is not None
        trace_spans = [
            s
            for s in otel[1].get_finished_spans()
            if s.context is not None and s.context.trace_id == server.context.trace_id
        ]
        assert [s for s in trace_spans if s.kind == trace.SpanKind.SERVER] == [server]


def test_a_catch_all_mount_of_a_fastapi_app(otel: Otel) -> None:
    """Starlette mounting FastAPI at ``/`` (the layout that had two spans per request)."""
    api = fastapi_app(tracer_provider=otel[0], metrics=False, logs=False)
    outer = Starlette(routes=[Route("/health", health), Mount("/", app=api)])
    outer.add_middleware(ProfilingMiddleware, **ours(otel))
    send(outer, *PATHS, "/health")
    spans = server_spans(otel[1])
    assert sorted(s.name for s in spans) == ["GET /health", *["GET /items/{item_id}"] * 3]
    assert all((s.attributes or {}).get(PROFILE_URL) for s in spans)


def test_owners_mounted_two_levels_down_and_otel_wrapped_mounts(otel: Otel) -> None:
    api = fastapi_app(tracer_provider=otel[0], metrics=False, logs=False)
    wrapped = OTelASGI(Starlette(routes=ROUTES), tracer_provider=otel[0])
    middle = Starlette(routes=[Mount("/api", app=api), Route("/health", health)])
    outer = Starlette(routes=[Mount("/v1", app=middle), Mount("/otel", app=wrapped)])
    app = ProfilingMiddleware(outer, **ours(otel))
    paths = ["/v1/api/items/1", "/v1/health", "/otel/items/2", "/v1/nothing"]
    assert [r.status_code for r in send(app, *paths)] == [200, 200, 200, 404]
    spans = server_spans(otel[1])
    assert len(spans) == 4, [s.name for s in spans]
    assert all((s.attributes or {}).get(PROFILE_URL) for s in spans)
    # FastAPI's, OTel's (named by path), ours by route; an unmatched path under a mount
    # by the mount point, as Starlette's own telemetry names it (it was "/v1/v1/{path}").
    names = sorted(s.name for s in spans)
    assert names == ["GET /items/{item_id}", "GET /otel/items/2", "GET /v1", "GET /v1/health"]


def test_a_mounted_app_with_tracing_off_gets_no_span_of_ours(otel: Otel) -> None:
    quiet = fastapi_app(tracer_provider=otel[0], tracing=False, metrics=False, logs=False)
    outer = Starlette(routes=[Route("/health", health), Mount("/quiet", app=quiet)])
    outer.add_middleware(ProfilingMiddleware, **ours(otel))
    send(outer, "/quiet/items/1", "/health")
    assert [s.name for s in server_spans(otel[1])] == ["GET /health"]


def test_our_span_takes_a_litestar_style_path_template(otel: Otel) -> None:
    async def app(scope: dict[str, Any], receive: Any, send_: Any) -> None:
        scope["path_template"] = "/items/{item_id:int}"  # as Litestar sets it
        await send_({"type": "http.response.start", "status": 200, "headers": []})
        await send_({"type": "http.response.body", "body": b"ok"})

    send(ProfilingMiddleware(app, **ours(otel)), "/items/7")
    [span] = server_spans(otel[1])
    assert span.name == "GET /items/{item_id:int}"
    assert (span.attributes or {})["http.route"] == "/items/{item_id:int}"


def flask_items_app() -> Any:
    from flask import Flask

    flask_app = Flask(__name__)

    @flask_app.get("/items/<int:item_id>")
    def get_item(item_id: int) -> str:
        marker_alpha(0.002)
        return f"item {item_id}"

    @flask_app.get("/health")
    def get_health() -> str:
        return "ok"

    @flask_app.get("/boom")
    def boom() -> str:
        raise RuntimeError("on purpose")

    return flask_app


def flask_trace_shape(exporter: InMemorySpanExporter) -> list[tuple[str, str, str]]:
    return sorted(
        (
            span.name,
            str(span.kind),
            span.instrumentation_scope.name if span.instrumentation_scope else "",
        )
        for span in exporter.get_finished_spans()
    )


@pytest.mark.parametrize("order", ["instrument_then_wrap", "wrap_then_instrument"])
def test_flask_instrumentor_keeps_its_server_span_and_gets_the_link(otel: Otel, order: str) -> None:
    """FlaskInstrumentor's span stays the one SERVER span (as without us), the profile is
    linked from it, and its ``excluded_urls`` still keep /health out of the traces."""
    from opentelemetry.instrumentation.flask import FlaskInstrumentor

    from otelprof_middleware import WSGIProfilingMiddleware

    paths = [*PATHS, "/health"]
    without_us = flask_items_app()
    FlaskInstrumentor().instrument_app(without_us, tracer_provider=otel[0], excluded_urls="health")
    try:
        assert [without_us.test_client().get(p).status_code for p in paths] == [200] * 4
        expected = flask_trace_shape(otel[1])
    finally:
        FlaskInstrumentor().uninstrument_app(without_us)
    otel[1].clear()

    flask_app = flask_items_app()
    settings = ours(otel)
    store = settings["profile_store"]
    middleware: WSGIProfilingMiddleware | None = None
    if order == "wrap_then_instrument":
        middleware = WSGIProfilingMiddleware(flask_app.wsgi_app, **settings)
        flask_app.wsgi_app = middleware  # type: ignore[method-assign]
    FlaskInstrumentor().instrument_app(flask_app, tracer_provider=otel[0], excluded_urls="health")
    try:
        if middleware is None:
            middleware = WSGIProfilingMiddleware(flask_app.wsgi_app, **settings)
            flask_app.wsgi_app = middleware  # type: ignore[method-assign]
        client = flask_app.test_client()
        assert [client.get(p).text for p in paths] == ["item 1", "item 2", "item 3", "ok"]
    finally:
        FlaskInstrumentor().uninstrument_app(flask_app)
    middleware.core.writer.flush(timeout=5.0)

    assert flask_trace_shape(otel[1]) == expected  # the same spans, kinds and owners
    check_one_linked_span_per_request(otel[1], PATHS, name="GET /items/<int:item_id>")
    [span] = [s for s in server_spans(otel[1]) if s.name.endswith("/items/<int:item_id>")][:1]
    assert span.instrumentation_scope is not None
    assert span.instrumentation_scope.name == "opentelemetry.instrumentation.flask"
    # Each profile holds the view's work, under its route.
    summaries = store.list(limit=10)
    assert sorted(s.route for s in summaries) == ["/items/<int:item_id>"] * 3
    record = store.get(summaries[0].trace_id)[0]
    assert "marker_alpha" in text_of(record.session())


def test_first_requests_arriving_together_all_join_the_flask_instrumentors_span(
    otel: Otel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first request finds out whether the app is instrumented inside; a request
    arriving meanwhile waits for the answer. It went on as if not: our own SERVER span,
    FlaskInstrumentor's demoted to INTERNAL under it (a real-user trial: 1 trial in 4
    with 6 first requests at once, under a short switch interval)."""
    import threading

    from opentelemetry.instrumentation.flask import FlaskInstrumentor

    from otelprof_middleware import WSGIProfilingMiddleware, wsgi

    checking, second_sent = threading.Event(), threading.Event()
    found_by_the_check = wsgi.instrumented_flask_app

    def slow_check(app: Any) -> Any:  # the first request's check, held open
        checking.set()
        second_sent.wait(0.3)  # (the second request never sets it: it is waiting)
        return found_by_the_check(app)

    monkeypatch.setattr(wsgi, "instrumented_flask_app", slow_check)
    flask_app = flask_items_app()
    FlaskInstrumentor().instrument_app(flask_app, tracer_provider=otel[0])
    try:
        middleware = WSGIProfilingMiddleware(flask_app.wsgi_app, **ours(otel))
        flask_app.wsgi_app = middleware  # type: ignore[method-assign]
        texts: list[str] = []
        first = threading.Thread(
            target=lambda: texts.append(flask_app.test_client().get("/items/1").text)
        )
        first.start()
        assert checking.wait(5)
        texts.append(flask_app.test_client().get("/items/2").text)
        second_sent.set()
        first.join(5)
    finally:
        FlaskInstrumentor().uninstrument_app(flask_app)
    middleware.core.writer.flush(timeout=5.0)
    assert sorted(texts) == ["item 1", "item 2"]
    spans = otel[1].get_finished_spans()
    assert (
        sorted((s.kind.name, s.instrumentation_scope.name) for s in spans)
        == [  # type: ignore[union-attr]
            ("SERVER", "opentelemetry.instrumentation.flask")
        ]
        * 2
    )
    assert all((s.attributes or {}).get(PROFILE_URL) for s in spans)


def test_flask_instrumentor_failed_request_is_kept_as_error(
    otel: Otel, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opentelemetry.instrumentation.flask import FlaskInstrumentor

    from otelprof_middleware import WSGIProfilingMiddleware

    # The package defaults: always-on, the keep policy (errors are kept).
    monkeypatch.setenv("OTELPROF_MIN_DURATION_MS", "")
    monkeypatch.setenv("OTELPROF_MODE", "")
    flask_app = flask_items_app()
    FlaskInstrumentor().instrument_app(flask_app, tracer_provider=otel[0])
    settings = {key: value for key, value in ours(otel).items() if key != "min_duration_ms"}
    try:
        middleware = WSGIProfilingMiddleware(flask_app.wsgi_app, **settings)
        flask_app.wsgi_app = middleware  # type: ignore[method-assign]
        assert flask_app.test_client().get("/boom").status_code == 500
        assert flask_app.test_client().get("/items/4").status_code == 200
    finally:
        FlaskInstrumentor().uninstrument_app(flask_app)
    middleware.core.writer.flush(timeout=5.0)
    [failed, fine] = sorted(server_spans(otel[1]), key=lambda s: s.name)
    assert (failed.attributes or {}).get(PROFILE_URL)
    assert not (fine.attributes or {}).get(PROFILE_URL)  # fast and fine: not kept, no link
    [summary] = settings["profile_store"].list(limit=10)
    assert (summary.kept_reason, summary.status_code, summary.mode) == ("error", 500, "always_on")


def test_flask_instrumented_globally_is_joined_too(otel: Otel) -> None:
    """``FlaskInstrumentor().instrument()`` before the app exists (opentelemetry-instrument
    does this): the app's class is the instrumentor's, its span is joined."""
    import flask
    from opentelemetry.instrumentation.flask import FlaskInstrumentor

    from otelprof_middleware import WSGIProfilingMiddleware

    FlaskInstrumentor().instrument(tracer_provider=otel[0])
    try:
        flask_app = flask.Flask(__name__)

        @flask_app.get("/items/<int:item_id>")
        def get_item(item_id: int) -> str:
            marker_alpha(0.002)
            return f"item {item_id}"

        flask_app.wsgi_app = WSGIProfilingMiddleware(flask_app.wsgi_app, **ours(otel))  # type: ignore[method-assign]
        client = flask_app.test_client()
        assert [client.get(p).text for p in PATHS] == ["item 1", "item 2", "item 3"]
    finally:
        FlaskInstrumentor().uninstrument()
    check_one_linked_span_per_request(otel[1], PATHS, name="GET /items/<int:item_id>")
    assert {
        s.instrumentation_scope.name for s in server_spans(otel[1]) if s.instrumentation_scope
    } == {"opentelemetry.instrumentation.flask"}


_: Callable[..., Any] = health  # (the excluded route's handler)


def test_route_attribute_reads_the_sdk_span(otel: Otel) -> None:
    """The route another instrumentation put on the span; none when it is missing, not a
    string, or the span has no attributes to read."""
    tracer = otel[0].get_tracer("test")
    with tracer.start_as_current_span("named", attributes={"http.route": "/items/{id}"}) as span:
        assert route_attribute(span) == "/items/{id}"
    with tracer.start_as_current_span("unnamed", attributes={"http.method": "GET"}) as span:
        assert route_attribute(span) is None
    with tracer.start_as_current_span("empty") as span:
        assert route_attribute(span) is None
    with tracer.start_as_current_span("odd", attributes={"http.route": 3}) as span:
        assert route_attribute(span) is None
    assert route_attribute(trace.INVALID_SPAN) is None

    class Attributes(Mapping[str, object]):  # a mapping with no copy()
        def __init__(self, items: dict[str, object]) -> None:
            self._items = items

        def __getitem__(self, key: str) -> object:
            return self._items[key]

        def __iter__(self) -> Iterator[str]:
            return iter(self._items)

        def __len__(self) -> int:
            return len(self._items)

    class OtherSpan:
        def __init__(self, attributes: Mapping[str, object]) -> None:
            self.attributes = attributes

    for wrap in (Attributes, lambda items: MappingProxyType(Attributes(items))):
        named = OtherSpan(wrap({"http.route": "/a/{b}"}))
        assert route_attribute(named) == "/a/{b}"  # type: ignore[arg-type]
        assert route_attribute(OtherSpan(wrap({}))) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("how", ["instrument_app", "instrument"])
def test_fastapi_instrumentor_excluded_urls_get_no_span(otel: Otel, how: str) -> None:
    """FastAPIInstrumentor's layer wraps the app's whole middleware stack, ours included,
    and opens no span for its ``excluded_urls``, without marking the scope: we opened a
    server span of our own for them (``opentelemetry-instrument`` with
    ``OTEL_PYTHON_FASTAPI_EXCLUDED_URLS=/health`` traced /health with the middleware,
    and not without it)."""
    instrumentor = FastAPIInstrumentor()
    if how == "instrument":  # as opentelemetry-instrument does: before the app is made
        instrumentor.instrument(tracer_provider=otel[0], excluded_urls="/health")
    try:
        import fastapi  # its FastAPI class as it is now (instrument() replaces it)

        app: Any = fastapi.FastAPI()
        app.get("/items/{item_id}")(_get_item)
        app.get("/health")(_get_health)
        if how == "instrument_app":
            FastAPIInstrumentor.instrument_app(
                app, tracer_provider=otel[0], excluded_urls="/health"
            )
        app.add_middleware(ProfilingMiddleware, **ours(otel))
        responses = send(app, *PATHS, "/health", "/health")
        assert [r.status_code for r in responses] == [200] * 5
        check_one_linked_span_per_request(otel[1], PATHS, name="GET /items/{item_id}")
    finally:
        if how == "instrument":
            instrumentor.uninstrument()
        else:
            FastAPIInstrumentor.uninstrument_app(app)


def _get_item(item_id: int) -> dict[str, int]:
    marker_alpha(0.002)
    return {"item": item_id}


def _get_health() -> str:
    return "ok"


# --- Litestar's OpenTelemetry plugin -------------------------------------------------------


def _litestar_app(provider: TracerProvider) -> Any:
    from litestar import Litestar, get
    from litestar.plugins.opentelemetry import OpenTelemetryConfig, OpenTelemetryPlugin

    @get("/items/{item_id:int}", sync_to_thread=False)
    def get_item(request: LitestarRequest[Any, Any, Any]) -> dict[str, int]:
        marker_alpha(0.002)
        return {"item": request.path_params["item_id"]}

    @get("/health", sync_to_thread=False)
    def get_health() -> str:
        return "ok"

    config = OpenTelemetryConfig(tracer_provider=provider, exclude=["/health"])
    return Litestar([get_item, get_health], plugins=[OpenTelemetryPlugin(config)])


def test_litestar_otel_plugin_owns_the_span_when_we_wrap_the_app(otel: Otel) -> None:
    """Litestar's ``OpenTelemetryPlugin`` puts OTel's ASGI middleware inside the Litestar
    app (around its router, in ``app.asgi_handler``), out of reach of a walk along
    ``.app``: wrapped with ``ProfilingMiddleware(Litestar(...))``, we opened a SERVER
    span of our own around it, its span became our INTERNAL child, and the paths its
    ``exclude`` leaves untraced got a server span of ours."""
    plain_provider, plain_exporter = make_provider()
    plain = send(_litestar_app(plain_provider), *PATHS, "/health")
    app = ProfilingMiddleware(_litestar_app(otel[0]), **ours(otel))
    responses = send(app, *PATHS, "/health")
    assert [(r.status_code, r.content) for r in responses] == [
        (r.status_code, r.content) for r in plain
    ]
    check_one_linked_span_per_request(otel[1], PATHS)
    # The trace has the shape it has without us: Litestar's own span, named as Litestar
    # names it, and none for /health.
    assert flask_trace_shape(otel[1]) == flask_trace_shape(plain_exporter)


def test_litestar_otel_plugin_unmatched_paths_share_the_empty_route(otel: Otel) -> None:
    """Litestar's plugin sets ``http.route`` to the method and the raw path (``GET
    /nowhere/1``), and Litestar matched no route for a 404: the profile's route fell back
    to that attribute, one route per scanned path in the index and the keep policy's
    per-route history. Litestar ran, so its ``path_template`` (none: no route) is the
    answer, as for any unmatched request."""
    store = MemoryStore()
    app = ProfilingMiddleware(_litestar_app(otel[0]), **{**ours(otel), "profile_store": store})
    paths = ["/items/1", "/nowhere/1", "/nowhere/2"]
    assert [r.status_code for r in send(app, *paths)] == [200, 404, 404]
    app.core.writer.flush()
    assert sorted(s.route for s in store.list()) == ["", "", "/items/{item_id}"]


# --- FalconInstrumentor (WSGI) -------------------------------------------------------------


def _falcon_items_app() -> Any:
    falcon = pytest.importorskip("falcon")  # (its module: instrument() replaces its App)

    class Item:
        def on_get(self, req: Any, resp: Any, item_id: int) -> None:
            marker_alpha(0.002)
            resp.media = {"item": item_id}

    class Health:
        def on_get(self, req: Any, resp: Any) -> None:
            resp.text = "ok"

    class Boom:
        def on_get(self, req: Any, resp: Any) -> None:
            raise RuntimeError("on purpose")

    class Auth:  # an app middleware: its work is the request's too
        def process_request(self, req: Any, resp: Any) -> None:
            marker_beta(0.002)

    app = falcon.App(middleware=[Auth()])
    app.add_route("/items/{item_id:int}", Item())
    app.add_route("/health", Health())
    app.add_route("/boom", Boom())
    return app


def test_falcon_instrumentor_keeps_its_server_span_and_gets_the_link(otel: Otel) -> None:
    """FalconInstrumentor opens its span in the instrumented app's ``__call__``, after
    every WSGI middleware: we opened a SERVER span of our own (named ``GET``), and its
    span became our INTERNAL child, which it then names by the raw path (``GET
    /items/1``, one name per id)."""
    pytest.importorskip("falcon")
    instrumentation = pytest.importorskip("opentelemetry.instrumentation.falcon")
    from werkzeug.test import Client

    from otelprof_middleware import WSGIProfilingMiddleware

    paths = [*PATHS, "/health", "/boom"]
    instrumentor = instrumentation.FalconInstrumentor()
    instrumentor.instrument(tracer_provider=otel[0])
    try:
        # One app for both runs: the instrumentor gives its tracer provider to the first
        # app built after instrument() only.
        app = _falcon_items_app()
        expected_status = [Client(app).get(p, buffered=True).status_code for p in paths]
        expected = flask_trace_shape(otel[1])
        otel[1].clear()
        settings = ours(otel)
        middleware = WSGIProfilingMiddleware(app, **settings)
        client = Client(middleware)
        assert [client.get(p, buffered=True).status_code for p in paths] == expected_status
    finally:
        instrumentor.uninstrument()
    middleware.core.writer.flush(timeout=5.0)

    assert flask_trace_shape(otel[1]) == expected  # the same spans, kinds and owners
    check_one_linked_span_per_request(otel[1], paths)
    assert sorted(s.name for s in server_spans(otel[1])) == [
        "GET /boom",
        "GET /health",
        *["GET /items/{item_id:int}"] * 3,
    ]
    summaries = settings["profile_store"].list(limit=10)
    assert sorted(s.route for s in summaries) == [
        "/boom",
        "/health",
        *["/items/{item_id:int}"] * 3,
    ]
    assert {s.status_code for s in summaries} == {200, 500}
    record = next(s for s in summaries if s.route.startswith("/items/"))
    text = text_of(settings["profile_store"].get(record.trace_id)[0].session())
    assert "marker_alpha" in text and "marker_beta" in text


# --- Quart: OTel's middleware on ``app.asgi_app`` ------------------------------------------


class _QuartLike:
    """What a Quart app is to an ASGI server (Quart is not in the test extra): its
    ``__call__`` calls ``self.asgi_app``, where OTel's docs put their ASGI middleware
    (``app.asgi_app = OpenTelemetryMiddleware(app.asgi_app)``)."""

    def __init__(self) -> None:
        self.asgi_app: Any = self._asgi_app

    async def __call__(self, scope: Any, receive: Any, send_: Any) -> None:
        await self.asgi_app(scope, receive, send_)

    async def _asgi_app(self, scope: Any, receive: Any, send_: Any) -> None:
        marker_alpha(0.002)
        await send_({"type": "http.response.start", "status": 200, "headers": []})
        await send_({"type": "http.response.body", "body": b"ok"})


def test_otel_middleware_on_a_quart_style_asgi_app_attribute_owns_the_span(otel: Otel) -> None:
    """``ProfilingMiddleware(quart_app)`` with OTel's ASGI middleware on
    ``quart_app.asgi_app``: the search for a span owner below us followed only ``.app``,
    so we opened a SERVER span of our own and OTel's became its INTERNAL child."""
    plain_provider, plain_exporter = make_provider()
    plain = _QuartLike()
    plain.asgi_app = OTelASGI(plain.asgi_app, tracer_provider=plain_provider)
    send(plain, *PATHS)
    inner = _QuartLike()
    inner.asgi_app = OTelASGI(inner.asgi_app, tracer_provider=otel[0])
    assert [r.text for r in send(ProfilingMiddleware(inner, **ours(otel)), *PATHS)] == ["ok"] * 3
    check_one_linked_span_per_request(otel[1], PATHS)
    assert flask_trace_shape(otel[1]) == flask_trace_shape(plain_exporter)


# --- OTel's WSGI middleware inside ours ------------------------------------------------------


def _wsgi_items(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    marker_alpha(0.002)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


@pytest.mark.parametrize("where", ["wrapped", "flask_wsgi_app"])
def test_otel_wsgi_middleware_inside_ours_owns_the_span(otel: Otel, where: str) -> None:
    """``WSGIProfilingMiddleware(OpenTelemetryMiddleware(app))``, or a Flask app whose
    ``wsgi_app`` OTel's middleware wraps, wrapped whole: OTel's span is the server span,
    as the README says (an app that already has a server span from OTel's WSGI
    middleware is joined). We opened one of our own, and OTel's became its INTERNAL
    child."""
    from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware as OTelWSGI
    from werkzeug.test import Client

    from otelprof_middleware import WSGIProfilingMiddleware

    def build(provider: TracerProvider) -> Any:
        if where == "wrapped":
            return OTelWSGI(_wsgi_items, tracer_provider=provider)
        flask_app = flask_items_app()
        flask_app.wsgi_app = OTelWSGI(  # type: ignore[method-assign]
            flask_app.wsgi_app, tracer_provider=provider
        )
        return flask_app

    plain_provider, plain_exporter = make_provider()
    plain = Client(build(plain_provider))
    expected = [plain.get(p, buffered=True).status_code for p in PATHS]
    middleware = WSGIProfilingMiddleware(build(otel[0]), **ours(otel))
    client = Client(middleware)
    assert [client.get(p, buffered=True).status_code for p in PATHS] == expected == [200] * 3
    middleware.core.writer.flush(timeout=5.0)
    check_one_linked_span_per_request(otel[1], PATHS)
    assert flask_trace_shape(otel[1]) == flask_trace_shape(plain_exporter)


def test_exclude_paths_hold_below_a_span_owner_inside_the_app(otel: Otel) -> None:
    """With the span's owner inside the app (OTel's ASGI middleware here; the same for
    Starlette's, FastAPI's telemetry, Litestar's plugin), requests are profiled by our
    joining copy below it, which never looked at ``exclude_paths``: once the first
    profiled request had put it there, every excluded path was profiled."""
    store = MemoryStore()
    inner = OTelASGI(Starlette(routes=ROUTES), tracer_provider=otel[0])
    app = ProfilingMiddleware(
        inner, **{**ours(otel), "profile_store": store, "exclude_paths": "/health"}
    )
    assert [r.status_code for r in send(app, "/items/1", "/health", "/health")] == [200] * 3
    app.core.writer.flush()
    assert [s.route for s in store.list()] == ["/items/{item_id:int}"]
    assert len(server_spans(otel[1])) == 3  # OTel's spans, as without us


@pytest.mark.parametrize("how", ["asgi_app", "whole_app"])
def test_our_span_takes_quarts_url_rule(otel: Otel, how: str) -> None:
    """Quart keeps its matched rule on its request, in a task of its own: our span was
    named ``GET`` alone and every profile had no route."""
    quart = pytest.importorskip("quart")
    app = quart.Quart(__name__)

    @app.get("/items/<int:item_id>")
    async def item(item_id: int) -> str:
        marker_alpha(0.002)
        return f"item {item_id}"

    @app.get("/boom/<int:n>")
    async def boom(n: int) -> str:
        raise RuntimeError("on purpose")

    store = MemoryStore()
    settings = {**ours(otel), "profile_store": store}
    if how == "asgi_app":
        app.asgi_app = ProfilingMiddleware(app.asgi_app, **settings)  # type: ignore[method-assign]
        served: Any = app
    else:
        served = ProfilingMiddleware(app, **settings)
    responses = send(served, "/items/1", "/items/2", "/boom/3", "/nowhere")
    assert [r.status_code for r in responses] == [200, 200, 500, 404]
    assert sorted(s.name for s in server_spans(otel[1])) == [
        "GET",
        "GET /boom/<int:n>",
        "GET /items/<int:item_id>",
        "GET /items/<int:item_id>",
    ]
    (served if how == "whole_app" else app.asgi_app).core.writer.flush()
    assert sorted(s.route for s in store.list()) == [
        "",
        "/boom/<int:n>",
        "/items/<int:item_id>",
        "/items/<int:item_id>",
    ]


@pytest.mark.parametrize("kind", ["wsgi", "asgi"])
def test_our_span_takes_falcons_uri_template(otel: Otel, kind: str) -> None:
    """Falcon keeps the matched template on its request object (``req.uri_template``),
    not in the environ or scope: our span was named ``GET`` alone and every profile had
    no route."""
    falcon = pytest.importorskip("falcon")
    falcon_asgi = pytest.importorskip("falcon.asgi")

    from otelprof_middleware import WSGIProfilingMiddleware

    class Item:
        def on_get(self, req: Any, resp: Any, item_id: int) -> None:
            marker_alpha(0.002)
            resp.media = {"item": item_id}

    class AsyncItem:
        async def on_get(self, req: Any, resp: Any, item_id: int) -> None:
            marker_alpha(0.002)
            resp.media = {"item": item_id}

    store = MemoryStore()
    settings = {**ours(otel), "profile_store": store}
    paths = ["/items/1", "/items/2", "/nowhere"]
    if kind == "wsgi":
        wsgi_app = falcon.App()
        wsgi_app.add_route("/items/{item_id:int}", Item())
        middleware: Any = WSGIProfilingMiddleware(wsgi_app, **settings)
        from werkzeug.test import Client

        client = Client(middleware)
        statuses = [client.get(p, buffered=True).status_code for p in paths]
    else:
        asgi_app = falcon_asgi.App()
        asgi_app.add_route("/items/{item_id:int}", AsyncItem())
        middleware = ProfilingMiddleware(asgi_app, **settings)
        statuses = [r.status_code for r in send(middleware, *paths)]
    assert statuses == [200, 200, 404]
    middleware.core.writer.flush()
    assert (
        sorted(s.name for s in server_spans(otel[1])) == ["GET"] + ["GET /items/{item_id:int}"] * 2
    )
    assert sorted(s.route for s in store.list()) == [""] + ["/items/{item_id:int}"] * 2
