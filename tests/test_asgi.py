from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from otelprof_middleware import ProfilingMiddleware, counters
from otelprof_middleware.profiling._span import PROFILE_ID, PROFILE_URL
from otelprof_middleware.stores import MemoryStore

from .helpers import (
    OWN_AND_OTHER,
    get_alpha_and_beta_at_once,
    http_scope,
    marker_alpha,
    marker_beta,
    server_spans,
    text_of,
)

LOOPBACK = ("127.0.0.1", 50000)


class Boom(RuntimeError):
    pass


async def alpha(request: Request) -> JSONResponse:
    await asyncio.sleep(0.002)
    marker_alpha(0.02)
    await asyncio.sleep(0.002)
    return JSONResponse({"endpoint": "alpha"})


async def beta(request: Request) -> JSONResponse:
    await asyncio.sleep(0.002)
    marker_beta(0.02)
    await asyncio.sleep(0.002)
    return JSONResponse({"endpoint": "beta"})


async def item(request: Request) -> JSONResponse:
    marker_alpha(0.005)
    return JSONResponse({"id": request.path_params["item_id"]})


async def stream(request: Request) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        for index in range(5):
            marker_beta(0.004)
            yield f"chunk{index}\n".encode()

    return StreamingResponse(body())


async def fail(request: Request) -> PlainTextResponse:
    marker_alpha(0.005)
    raise Boom("on purpose")


def make_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/alpha", alpha),
            Route("/beta", beta),
            Route("/items/{item_id}", item),
            Route("/stream", stream),
            Route("/fail", fail),
        ]
    )


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


def wrap(
    otel: tuple[TracerProvider, InMemorySpanExporter], store: MemoryStore, **settings: Any
) -> ProfilingMiddleware:
    settings.setdefault("sample_rate", 1.0)
    settings.setdefault("debug_route", True)
    return ProfilingMiddleware(make_app(), tracer_provider=otel[0], profile_store=store, **settings)


def test_opens_one_server_span_links_it_and_stores_the_profile(
    otel: tuple[TracerProvider, InMemorySpanExporter], store: MemoryStore, closing: list[Any]
) -> None:
    app = wrap(otel, store)
    closing.append(app)
    with TestClient(app, client=LOOPBACK) as client:
        response = client.get("/items/42")
        assert response.json() == {"id": "42"}
        assert app.core.writer.flush()
        spans = server_spans(otel[1])
        assert len(spans) == 1
        span = spans[0]
        trace_id = format(span.context.trace_id, "032x")
        span_id = format(span.context.span_id, "016x")
        assert span.attributes is not None
        assert span.attributes[PROFILE_ID] == f"{trace_id}-{span_id}"
        url = str(span.attributes[PROFILE_URL])
        assert url == f"http://testserver/debug/profile/{trace_id}?span_id={span_id}"
        [record] = store.get(trace_id)
        assert record.summary.route == "/items/{item_id}"
        assert record.summary.method == "GET"
        assert record.summary.status_code == 200
        assert "marker_alpha" in text_of(record.session())
        page = client.get(url.replace("http://testserver", ""), params={"format": "text"})
        assert page.status_code == 200
        assert "marker_alpha" in page.text


def test_joins_an_outer_otel_middleware_span(
    otel: tuple[TracerProvider, InMemorySpanExporter], store: MemoryStore, closing: list[Any]
) -> None:
    inner = wrap(otel, store)
    closing.append(inner)
    app = OpenTelemetryMiddleware(inner, tracer_provider=otel[0])
    with TestClient(app, client=LOOPBACK) as client:
        assert client.get("/alpha").status_code == 200
    spans = server_spans(otel[1])
    assert len(spans) == 1
    assert spans[0].attributes is not None and PROFILE_URL in spans[0].attributes


def test_joins_fastapi_native_and_instrumentor_spans(
    otel: tuple[TracerProvider, InMemorySpanExporter], store: MemoryStore, closing: list[Any]
) -> None:
    from fastapi import FastAPI
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    for use_instrumentor in (False, True):
        otel[1].clear()
        api = FastAPI(telemetry={"tracer_provider": otel[0]})  # type: ignore[typeddict-item]

        @api.get("/things/{thing_id}")
        async def thing(thing_id: int) -> dict[str, int]:
            marker_alpha(0.005)
            return {"thing_id": thing_id}

        api.add_middleware(
            ProfilingMiddleware, profile_store=store, sample_rate=1.0, tracer_provider=otel[0]
        )
        if use_instrumentor:
            FastAPIInstrumentor.instrument_app(api, tracer_provider=otel[0])
        with TestClient(api, client=LOOPBACK) as client:
            assert client.get("/things/7").json() == {"thing_id": 7}
        spans = server_spans(otel[1])
        assert len(spans) == 1, [s.name for s in spans]
        assert spans[0].attributes is not None
        assert PROFILE_URL in spans[0].attributes, use_instrumentor
        if use_instrumentor:
            FastAPIInstrumentor.uninstrument_app(api)


def test_exception_keeps_profile_and_span_records_error(
    otel: tuple[TracerProvider, InMemorySpanExporter], store: MemoryStore, closing: list[Any]
) -> None:
    app = wrap(otel, store)
    closing.append(app)
    with TestClient(app, client=LOOPBACK, raise_server_exceptions=False) as client:
        assert client.get("/fail").status_code == 500
    with TestClient(app, client=LOOPBACK) as client, pytest.raises(Boom):
        client.get("/fail")
    app.core.writer.flush()
    [span, _] = server_spans(otel[1])
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes is not None and PROFILE_URL in span.attributes
    records = store.list()
    assert len(records) == 2
    assert {r.status_code for r in records} == {500}
    [record] = store.get(records[0].trace_id)
    assert "fail" in text_of(record.session())


def test_streaming_body_is_profiled_until_the_last_chunk(
    otel: tuple[TracerProvider, InMemorySpanExporter], store: MemoryStore, closing: list[Any]
) -> None:
    app = wrap(otel, store)
    closing.append(app)
    with TestClient(app, client=LOOPBACK) as client:
        assert client.get("/stream").text == "".join(f"chunk{i}\n" for i in range(5))
    app.core.writer.flush()
    [summary] = store.list()
    [record] = store.get(summary.trace_id)
    assert "marker_beta" in text_of(record.session())
    assert summary.duration_ms >= 15


def test_min_duration_drops_fast_requests_and_sets_no_attribute(
    otel: tuple[TracerProvider, InMemorySpanExporter], store: MemoryStore, closing: list[Any]
) -> None:
    app = wrap(otel, store, min_duration_ms=10_000)
    closing.append(app)
    with TestClient(app, client=LOOPBACK) as client:
        client.get("/alpha")
    app.core.writer.flush()
    assert store.list() == []
    [span] = server_spans(otel[1])
    assert span.attributes is not None and PROFILE_URL not in span.attributes


def test_unsampled_requests_are_untouched(
    otel: tuple[TracerProvider, InMemorySpanExporter], store: MemoryStore, closing: list[Any]
) -> None:
    app = wrap(otel, store, sample_rate=0.0)
    closing.append(app)
    with TestClient(app, client=LOOPBACK) as client:
        assert client.get("/alpha").json() == {"endpoint": "alpha"}
        # the trigger header works in development (viewer on, no token)
        assert client.get("/beta", headers={"x-otelprof": "1"}).status_code == 200
    app.core.writer.flush()
    assert [s.route for s in store.list()] == ["/beta"]


def test_debug_route_is_off_by_default_and_passes_through(
    otel: tuple[TracerProvider, InMemorySpanExporter], store: MemoryStore, closing: list[Any]
) -> None:
    app = wrap(otel, store, debug_route=False)
    closing.append(app)
    with TestClient(app, client=LOOPBACK) as client:
        response = client.get("/debug/profile")
    assert response.status_code == 404
    assert "content-security-policy" not in response.headers  # the app's own 404


def test_viewer_refuses_non_loopback_and_requires_token(
    otel: tuple[TracerProvider, InMemorySpanExporter], store: MemoryStore, closing: list[Any]
) -> None:
    app = wrap(otel, store)
    closing.append(app)
    with TestClient(app, client=("203.0.113.9", 4000)) as client:
        assert client.get("/debug/profile").status_code == 403
    tokened = wrap(otel, store, debug_token="tok-123")
    closing.append(tokened)
    with TestClient(tokened, client=LOOPBACK) as client:
        assert client.get("/debug/profile").status_code == 401
        ok = client.get("/debug/profile", headers={"authorization": "Bearer tok-123"})
        assert ok.status_code == 200
        assert ok.headers["x-content-type-options"] == "nosniff"
        assert "content-security-policy" in ok.headers
        client.get("/alpha", headers={"x-otelprof": "tok-123"})
    tokened.core.writer.flush()
    for span in server_spans(otel[1]):
        assert "tok-123" not in str(span.attributes)


def test_malformed_and_unknown_ids(
    otel: tuple[TracerProvider, InMemorySpanExporter], store: MemoryStore, closing: list[Any]
) -> None:
    app = wrap(otel, store)
    closing.append(app)
    with TestClient(app, client=LOOPBACK) as client:
        assert client.get("/debug/profile/not-an-id").status_code == 400
        assert client.get("/debug/profile/" + "A" * 32).status_code == 400
        assert client.get("/debug/profile/" + "a" * 32).status_code == 404
        assert client.get("/debug/profile/" + "a" * 32, params={"span_id": "zz"}).status_code == 400


class BrokenStore(MemoryStore):
    def put(self, record: Any) -> None:
        raise OSError("disk on fire")

    def put_many(self, records: Any) -> None:  # (the writer batches when it can)
        raise OSError("disk on fire")

    def get(self, trace_id: str, span_id: str | None = None) -> Any:
        raise OSError("disk on fire")

    def list(self, **kwargs: Any) -> Any:
        raise OSError("disk on fire")


def test_store_failure_never_changes_the_response(
    otel: tuple[TracerProvider, InMemorySpanExporter], closing: list[Any]
) -> None:
    plain = TestClient(make_app(), client=LOOPBACK)
    app = wrap(otel, BrokenStore())  # type: ignore[arg-type]
    closing.append(app)
    with TestClient(app, client=LOOPBACK) as client:
        for path in ("/alpha", "/items/9", "/stream", "/nope"):
            ours, theirs = client.get(path), plain.get(path)
            assert (ours.status_code, ours.content) == (theirs.status_code, theirs.content)
        app.core.writer.flush()
        assert client.get("/debug/profile").status_code == 503

    assert counters()["failed.store.put"] == 4


@pytest.mark.anyio
async def test_concurrent_requests_never_mix(
    otel: tuple[TracerProvider, InMemorySpanExporter], store: MemoryStore, closing: list[Any]
) -> None:
    app = wrap(otel, store)
    closing.append(app)
    responses = await get_alpha_and_beta_at_once(app, 24)
    assert all(r.status_code == 200 for r in responses)
    app.core.writer.flush()
    summaries = store.list()
    assert len(summaries) == 24
    for summary in summaries:
        [record] = store.get(summary.trace_id)
        text = text_of(record.session())
        own, other = OWN_AND_OTHER[summary.route]
        assert own in text and other not in text, text


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_crashing_profiler_leaves_the_request_alone(
    otel: tuple[TracerProvider, InMemorySpanExporter],
    store: MemoryStore,
    closing: list[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from otelprof_middleware.profiling import _loop_hook

    def explode(*args: Any, **kwargs: Any) -> None:
        if args or kwargs.get("target") is not None:
            raise RuntimeError("profiler broke")

    monkeypatch.setattr(_loop_hook, "setstatprofile", explode)
    app = wrap(otel, store)
    closing.append(app)
    with TestClient(app, client=LOOPBACK) as client:
        for _ in range(3):
            assert client.get("/alpha").json() == {"endpoint": "alpha"}
    app.core.writer.flush()

    assert counters()["failed.profiler.start"] == 3
    assert store.list() == []
    assert app.core.hook_start.slots_in_use == 0  # the concurrency slot was given back


@pytest.mark.anyio
async def test_client_disconnect_mid_stream_keeps_the_profile(
    otel: tuple[TracerProvider, InMemorySpanExporter], store: MemoryStore, closing: list[Any]
) -> None:
    app = wrap(otel, store)
    closing.append(app)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(10)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and len(sent) >= 3:
            raise OSError("client went away")

    scope = http_scope(
        "/stream",
        headers=[(b"host", b"example.test")],
        client=LOOPBACK,
        server=("127.0.0.1", 8000),
    )
    with pytest.raises(BaseException):  # noqa: B017 - whatever the app lets escape
        await app(scope, receive, send)
    app.core.writer.flush()
    [summary] = store.list()
    assert summary.route == "/stream"
    [span] = server_spans(otel[1])
    assert span.attributes is not None and PROFILE_URL in span.attributes
    assert app.core.hook_start.slots_in_use == 0


@pytest.mark.anyio
async def test_lifespan_and_websocket_pass_straight_through(
    store: MemoryStore, closing: list[Any]
) -> None:
    seen: list[str] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    app = ProfilingMiddleware(inner, profile_store=store, sample_rate=1.0)
    closing.append(app)
    for kind in ("lifespan", "websocket"):
        await app({"type": kind, "path": "/"}, None, None)  # type: ignore[arg-type]
    assert seen == ["lifespan", "websocket"]


def test_no_sdk_provider_means_no_profile_even_when_triggered(
    store: MemoryStore, closing: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Without an SDK provider (or with ``OTEL_SDK_DISABLED=true``) requests have no valid
    span: nothing is profiled, and the middleware says so once rather than stay silent
    (a user who forgot the SDK saw no profile and no reason)."""
    from opentelemetry.trace import NoOpTracerProvider

    app = ProfilingMiddleware(
        make_app(),
        tracer_provider=NoOpTracerProvider(),
        profile_store=store,
        sample_rate=1.0,
        debug_route=True,
    )
    closing.append(app)
    with TestClient(app, client=LOOPBACK) as client, caplog.at_level("WARNING"):
        assert client.get("/beta", headers={"x-otelprof": "1"}).json() == {"endpoint": "beta"}
        assert client.get("/beta").json() == {"endpoint": "beta"}
    app.core.writer.flush()
    assert store.list() == []
    said = [r.getMessage() for r in caplog.records if r.name == "otelprof_middleware"]
    assert len(said) == 1 and "no valid OpenTelemetry span" in said[0], said
    assert counters()["skipped.no_span"] == 2


def test_no_sdk_provider_is_said_once_per_process_not_once_per_app(
    store: MemoryStore, closing: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A test suite without an SDK provider whose app factory builds an app per test heard
    the warning once per app: every test's first request logged it, and a test that asserts
    on its own log records (``caplog.messages == [...]``) failed only with the middleware.
    It is a fact about the process, said once per process (again after testing.reset())."""
    from opentelemetry.trace import NoOpTracerProvider

    from otelprof_middleware import testing

    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "otelprof_middleware"]

    with caplog.at_level("WARNING"):
        for _ in range(3):  # three tests, each with its own app from the factory
            app = ProfilingMiddleware(
                make_app(), tracer_provider=NoOpTracerProvider(), profile_store=store
            )
            closing.append(app)
            with TestClient(app) as client:
                assert client.get("/beta").json() == {"endpoint": "beta"}
        assert len(said()) == 1 and "no valid OpenTelemetry span" in said()[0], said()
        testing.reset()
        with TestClient(app) as client:
            client.get("/beta")
        assert len(said()) == 2, said()


def test_def_endpoint_work_on_the_worker_thread_is_in_the_profile(
    otel: tuple[TracerProvider, InMemorySpanExporter], store: MemoryStore, closing: list[Any]
) -> None:
    from fastapi import Depends, FastAPI

    def sync_dependency() -> int:
        marker_beta(0.01)
        return 1

    api = FastAPI()

    @api.get("/report")
    def report(dep: int = Depends(sync_dependency)) -> dict[str, int]:
        marker_alpha(0.02)
        return {"dep": dep}

    app = ProfilingMiddleware(api, tracer_provider=otel[0], profile_store=store, sample_rate=1.0)
    closing.append(app)
    with TestClient(app, client=LOOPBACK) as client:
        assert client.get("/report").json() == {"dep": 1}
    app.core.writer.flush()
    [summary] = store.list()
    text = text_of(store.get(summary.trace_id)[0].session())
    # the worker's real frames, placed under the request (below run_in_threadpool)
    assert "marker_alpha" in text and "marker_beta" in text, text
    assert text.index("run_in_threadpool") < text.index("marker_alpha")


def test_span_carries_the_baseline_link_when_the_route_matched(
    otel: tuple[TracerProvider, InMemorySpanExporter], store: MemoryStore, closing: list[Any]
) -> None:
    from otelprof_middleware.profiling._span import BASELINE_URL

    app = wrap(otel, store)
    closing.append(app)
    with TestClient(app, client=LOOPBACK) as client:
        client.get("/items/1")
        client.get("/items/2")
        client.get("/no-such-route")
        app.core.writer.flush()
        by_path = {s.attributes["http.target"]: s for s in server_spans(otel[1])}  # type: ignore[index]
        link = str(by_path["/items/2"].attributes[BASELINE_URL])  # type: ignore[index]
        assert "/diff?span_id=" in link
        assert BASELINE_URL not in by_path["/no-such-route"].attributes  # type: ignore[operator]
        page = client.get(link.replace("http://testserver", ""), params={"format": "json"})
        assert page.status_code == 200
        assert page.json()["baseline_profiles"] == 1


def _frames_named(frame: Any, function: str) -> list[Any]:
    found = [frame] if frame.function == function else []
    for child in frame.children:
        found.extend(_frames_named(child, function))
    return found


def _await_time_under(root: Any, function: str) -> float:
    """The ``[await]`` time in ``root``'s tree with ``function`` among its callers."""
    total = 0.0
    for wait in _frames_named(root, "[await]"):
        parent = wait.parent
        while parent is not None and parent.function != function:
            parent = parent.parent
        if parent is not None:
            total += wait.time
    return total


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["hook", "always_on"])
async def test_a_streaming_bodys_waits_are_where_the_body_waits(
    mode: str, otel: tuple[TracerProvider, InMemorySpanExporter], closing: list[Any]
) -> None:
    """Starlette streams the body in a child task while the request's own task waits for
    the client in ``listen_for_disconnect`` (servers reporting ASGI spec < 2.4: uvicorn,
    hypercorn, httpx's transport). What the body awaits (an upstream call) is where the
    request waits: it goes under ``stream_response``, not under the wait for the client
    (was: all of it under ``listen_for_disconnect``, in both modes)."""

    async def upstream() -> AsyncIterator[bytes]:
        for index in range(3):
            await asyncio.sleep(0.1)  # a slow upstream (an LLM's stream, say)
            yield f"token{index}\n".encode()

    async def relay(request: Request) -> StreamingResponse:
        return StreamingResponse(upstream())

    store = MemoryStore()
    app = ProfilingMiddleware(
        Starlette(routes=[Route("/relay", relay)]),
        tracer_provider=otel[0],
        profile_store=store,
        sample_rate=1.0,
        min_duration_ms=0,
        mode=mode,
    )
    closing.append(app)
    transport = httpx.ASGITransport(app=app, client=LOOPBACK)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        assert (await client.get("/relay")).text == "token0\ntoken1\ntoken2\n"
    assert app.core.writer.flush(10)
    [summary] = store.list()
    [record] = store.get(summary.trace_id)
    root = record.session().root_frame()
    assert root is not None
    in_body = _await_time_under(root, "stream_response")
    for_client = _await_time_under(root, "listen_for_disconnect")
    assert in_body >= 0.2, (in_body, for_client)  # of the 0.3 s the upstream took
    assert for_client < 0.1, (in_body, for_client)


@pytest.mark.anyio
async def test_a_request_in_a_context_left_by_an_earlier_one_gets_its_own_span(
    otel: tuple[TracerProvider, InMemorySpanExporter], store: MemoryStore, closing: list[Any]
) -> None:
    # On an asyncio loop, uvicorn resumes reading a connection from inside the request
    # that paused it: the next request on it starts in that request's context, whose
    # server span has ended (CPython gh-140947). It is no span to join.
    import contextvars

    app = wrap(otel, store)
    closing.append(app)
    left: list[contextvars.Context] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if not left:  # the context the server's resume_reading() captures
            left.append(contextvars.copy_context())

    await app(http_scope("/alpha"), receive, send)
    [first] = server_spans(otel[1])
    await left[0].run(asyncio.create_task, app(http_scope("/beta"), receive, send))
    assert app.core.writer.flush()
    spans = server_spans(otel[1])
    assert len(spans) == 2, spans
    second = spans[1]
    assert second.parent is None and second.context.trace_id != first.context.trace_id
    assert second.name == "GET /beta"
    assert second.attributes is not None and PROFILE_URL in second.attributes
    [record] = store.get(format(second.context.trace_id, "032x"))
    assert "marker_beta" in text_of(record.session())
