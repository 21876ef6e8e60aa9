"""The app behaves exactly as without us: the failure kinds the frameworks' suites found.

Each test compares the app with and without the middleware, or runs a script in a
subprocess where a crash, a hang at exit or an exception raised into the app's frames
would show (in-process they would take pytest down with them).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock
from wsgiref.util import setup_testing_defaults

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from otelprof_middleware import ProfilingMiddleware, WSGIProfilingMiddleware, counters
from otelprof_middleware.stores import MemoryStore

from .helpers import drive, http_scope, make_provider, marker_alpha, server_spans

ROOT = Path(__file__).resolve().parents[1]
MODES = ["hook", "always_on"]
Message = dict[str, Any]


def run_script(source: str, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run ``source`` in a fresh interpreter; a hang past ``timeout`` fails the test."""
    try:
        return subprocess.run(
            [sys.executable, "-c", textwrap.dedent(source), *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the script did not exit within {timeout:g} s: {exc.stderr!r}")


FLASK_CLIENT_REUSED = """
    import sys
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    trace.set_tracer_provider(TracerProvider())
    import flask
    from otelprof_middleware import WSGIProfilingMiddleware

    app = flask.Flask(__name__)
    if sys.argv[1] != "none":
        app.wsgi_app = WSGIProfilingMiddleware(
            app.wsgi_app, sample_rate=1.0, store="memory://", min_duration_ms=0, mode=sys.argv[1]
        )

    @app.route("/")
    def index():
        return "ok"

    @app.route("/x/<int:i>")
    def bad(i):
        flask.abort(400)

    client = app.test_client()
    seen = []
    with client:  # contexts preserved between requests; responses never closed
        for _ in range(60):
            for method, path in (("GET", "/"), ("GET", "/x/1"), ("GET", "/nope"), ("POST", "/x/1")):
                seen.append(client.open(path, method=method).status_code)
    print(sorted(set(seen)), len(seen))
"""


@pytest.mark.parametrize("mode", MODES)
def test_flask_client_reused_with_unclosed_responses(mode: str) -> None:
    """Under ``with client:`` and unclosed responses, nothing raises into werkzeug's
    matcher and no status changes (was: segfaults, "failed to get value of the context
    var", 400 turned 404: the hook removed inside pyinstrument's C callback)."""
    baseline = run_script(FLASK_CLIENT_REUSED, "none")
    assert baseline.returncode == 0, baseline.stderr
    for _ in range(3):  # the crash it guards against was intermittent
        result = run_script(FLASK_CLIENT_REUSED, mode)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout == baseline.stdout
        assert "Traceback" not in result.stderr, result.stderr[-3000:]


EXIT_WITH_UNCLOSED_WSGI = """
    import sys
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    trace.set_tracer_provider(TracerProvider())
    import flask
    from otelprof_middleware import WSGIProfilingMiddleware

    app = flask.Flask(__name__)
    app.wsgi_app = WSGIProfilingMiddleware(
        app.wsgi_app, sample_rate=1.0, store="memory://", min_duration_ms=0, mode=sys.argv[1]
    )

    @app.route("/")
    def index():
        return "ok"

    @app.route("/stream")
    def stream():
        return flask.Response(iter([b"a", b"b", b"c"]))

    client = app.test_client()
    client.get("/")
    response = client.get("/stream")  # read one chunk, never closed
    print("end of script")
"""

EXIT_WITH_UNCLOSED_ASGI = """
    import sys
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    trace.set_tracer_provider(TracerProvider())
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse, StreamingResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient
    from otelprof_middleware import ProfilingMiddleware

    async def chunks():
        for part in (b"a", b"b", b"c"):
            yield part

    app = Starlette(routes=[
        Route("/", lambda request: PlainTextResponse("ok")),
        Route("/stream", lambda request: StreamingResponse(chunks())),
    ])
    app.add_middleware(
        ProfilingMiddleware, sample_rate=1.0, store="memory://", min_duration_ms=0,
        mode=sys.argv[1],
    )
    client = TestClient(app)
    client.get("/")
    stream = client.stream("GET", "/stream").__enter__()  # never exited
    print("end of script")
"""


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("script", [EXIT_WITH_UNCLOSED_WSGI, EXIT_WITH_UNCLOSED_ASGI])
def test_process_exits_with_responses_left_unclosed(script: str, mode: str) -> None:
    """Nothing at or after interpreter shutdown blocks (was: a hang at exit, the writer's
    first thread start waiting during finalization)."""
    result = run_script(script, mode, timeout=20.0)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "end of script"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


EXIT_WITH_UNCLOSED_WSGI_EXPORTING = """
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    trace.set_tracer_provider(provider)
    import flask
    from otelprof_middleware import WSGIProfilingMiddleware

    app = flask.Flask(__name__)
    app.wsgi_app = WSGIProfilingMiddleware(app.wsgi_app, store="memory://")

    @app.route("/")
    def index():
        return "ok"

    response = app.test_client().get("/")  # never closed: collected at exit
    print("end of script")
"""


def test_a_body_collected_at_exit_ends_nothing() -> None:
    """A response left unclosed in a module global is collected as the interpreter
    finalizes, after the tracer provider's own shutdown: ending our span then printed
    "Processor is already shutdown, ignoring call" (CPython 3.13: "Exception ignored in
    _ClosingBody.__del__" and a traceback from logging). Nothing is ended then."""
    result = run_script(EXIT_WITH_UNCLOSED_WSGI_EXPORTING)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "end of script"
    assert result.stderr == ""


# --- ASGI faults: the response is byte-identical to the app's without us --------------


async def _hello(scope: Message, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
    marker_alpha(0.002)
    await send({"type": "http.response.start", "status": 201, "headers": [(b"x-a", b"1")]})
    await send({"type": "http.response.body", "body": b"hel", "more_body": True})
    await send({"type": "http.response.body", "body": b"lo"})


def _profiled(app: Any, **settings: Any) -> ProfilingMiddleware:
    provider, _ = make_provider()
    settings = {"sample_rate": 1.0, "min_duration_ms": 0, **settings}
    return ProfilingMiddleware(
        app, tracer_provider=provider, profile_store=MemoryStore(), **settings
    )


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_scope_without_headers(mode: str) -> None:
    scope = http_scope()
    del scope["headers"]
    expected = await drive(_hello, dict(scope))
    middleware = _profiled(_hello, mode=mode)
    assert await drive(middleware, dict(scope)) == expected
    middleware.core.writer.flush(5)
    # Profiled all the same: the link's host falls back to the scope's server.
    [record] = middleware.core.get_store().list()
    assert record.route == ""


class _RaisingRoute:
    @property
    def path(self) -> str:
        raise RuntimeError("injected: the route lookup raises")


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_raising_route_and_host_lookups(
    mode: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def app(scope: Message, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        scope["route"] = _RaisingRoute()
        await _hello(scope, receive, send)

    expected = await drive(app, http_scope())
    from otelprof_middleware.profiling import _active_profile

    def raising_host(host: str | None) -> str | None:
        raise RuntimeError("injected: the host lookup raises")

    monkeypatch.setattr(_active_profile, "safe_host", raising_host)  # the engine makes links
    middleware = _profiled(app, mode=mode)
    for _ in range(3):
        assert await drive(middleware, http_scope()) == expected
    seen = counters()
    assert seen.get("failed.profiler.finish") == 3, seen
    logged = [r for r in caplog.records if "profiler.finish failed" in r.getMessage()]
    assert len(logged) == 1  # logged once, counted every time


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_raising_send_reaches_the_app_unchanged(mode: str) -> None:
    """A server's ``send`` that raises (the client went away) raises in the app exactly
    as without us, and the profile still ends."""

    class Gone(OSError):
        pass

    seen_by_app: list[BaseException] = []

    async def app(scope: Message, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        try:
            await _hello(scope, receive, send)
        except Gone as exc:
            seen_by_app.append(exc)
            raise

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            raise Gone("client disconnected")

    middleware = _profiled(app, mode=mode)
    with pytest.raises(Gone, match="client disconnected"):
        await middleware(http_scope(), receive, send)
    assert len(seen_by_app) == 1
    assert middleware.core.writer.flush(5)
    [record] = middleware.core.get_store().list()
    assert record.status_code == 201


def test_writer_does_not_call_patched_json_dumps() -> None:
    """FastAPI's suite patches ``json.dumps`` and asserts it is not called."""

    def endpoint(request: Request) -> PlainTextResponse:
        marker_alpha(0.002)
        return PlainTextResponse("ok")

    from starlette.testclient import TestClient

    app = Starlette(routes=[Route("/", endpoint)])
    provider, _ = make_provider()
    middleware = ProfilingMiddleware(
        app, tracer_provider=provider, profile_store=MemoryStore(), sample_rate=1.0
    )
    with (
        mock.patch("json.dumps", side_effect=AssertionError("json.dumps called")) as dumps,
        mock.patch("json.loads", side_effect=AssertionError("json.loads called")) as loads,
    ):
        with TestClient(middleware) as client:
            assert client.get("/").text == "ok"
        assert middleware.core.writer.flush(5)
        [summary] = middleware.core.get_store().list()
        [record] = middleware.core.get_store().get(summary.trace_id)
        assert "marker_alpha" in json.JSONEncoder().encode(record.session().to_json())
    assert dumps.call_count == 0 and loads.call_count == 0


def test_wsgi_span_ends_when_the_body_is_exhausted_without_close() -> None:
    """Test clients read the body and never close it: the span we opened ends and the
    profile is kept at exhaustion, as with OpenTelemetry's own middleware."""
    provider, exporter = make_provider()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        marker_alpha(0.002)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"a", b"b"]

    middleware = WSGIProfilingMiddleware(
        app, tracer_provider=provider, profile_store=MemoryStore(), sample_rate=1.0
    )
    client = httpx.Client(transport=httpx.WSGITransport(app=middleware))
    assert client.get("http://testserver/x").text == "ab"
    [span] = server_spans(exporter)
    assert "otelprof.profile.url" in (span.attributes or {})
    assert middleware.core.writer.flush(5)
    assert len(middleware.core.get_store().list()) == 1


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_query_string_otel_cannot_decode_reaches_the_app() -> None:
    """OpenTelemetry's ASGI middleware (which opens our span when nothing else did)
    decodes the query string as strict UTF-8 before the app runs: the app must still
    answer, as without us (Django answers 400 to such a query; it got an exception)."""

    async def app(scope: Message, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        await send({"type": "http.response.start", "status": 400, "headers": []})
        await send({"type": "http.response.body", "body": repr(scope["query_string"]).encode()})

    scope = http_scope(query_string=b"\xff")
    expected = await drive(app, dict(scope))
    assert await drive(_profiled(app), dict(scope)) == expected
    assert counters()["failed.span"] == 1


@pytest.mark.anyio
async def test_app_exceptions_under_our_span_are_untouched() -> None:
    async def app(scope: Message, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        raise LookupError("the app's own")

    with pytest.raises(LookupError, match="the app's own"):
        await drive(_profiled(app), http_scope())
    assert "failed.span" not in counters()


class _RaisingOnEnd(SpanProcessor):
    """A span processor that raises when a span ends (the SDK does not guard on_end)."""

    def on_end(self, span: ReadableSpan) -> None:
        raise RuntimeError("injected: a span processor raises at the span's end")


@pytest.mark.anyio
@pytest.mark.parametrize("ending", ["raises", "returns_mid_body"])
async def test_app_runs_once_when_otel_fails_after_it(ending: str) -> None:
    """The span we have OTel's middleware open ends in that middleware's ``finally`` when
    the app did not finish its response (it raised, or returned mid-body as Starlette's
    ``StreamingResponse`` does when the client left). An exception raised there is not
    the app's, but the app ran: it must never be called a second time (was: a POST
    handler ran twice, the second time after its client had gone)."""
    calls: list[str] = []

    async def app(scope: Message, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        calls.append(scope["method"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        if ending == "raises":
            raise LookupError("the app's own")

    provider = TracerProvider()
    provider.add_span_processor(_RaisingOnEnd())
    middleware = ProfilingMiddleware(
        app, tracer_provider=provider, profile_store=MemoryStore(), sample_rate=1.0
    )
    with pytest.raises(Exception) as raised:
        await drive(middleware, http_scope(method="POST"))
    assert calls == ["POST"]
    assert "failed.span" not in counters()
    if ending == "raises":  # the processor's exception, raised while the app's went up
        assert isinstance(raised.value.__context__, LookupError)


@pytest.mark.parametrize("with_span", [False, True], ids=["own_span", "joined"])
def test_wsgi_file_wrapper_reaches_the_server(with_span: bool) -> None:
    """The server must still see its ``wsgi.file_wrapper`` (sendfile); the profile is kept."""
    from opentelemetry import trace

    class FileWrapper:
        def __init__(self, file: Any, block_size: int = 8192) -> None:
            self.file = file

        def __iter__(self) -> Any:
            return iter([self.file])

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        marker_alpha(0.002)
        start_response("200 OK", [])
        return environ["wsgi.file_wrapper"](b"file bytes")

    provider, exporter = make_provider()
    middleware = WSGIProfilingMiddleware(
        app, tracer_provider=provider, profile_store=MemoryStore(), sample_rate=1.0
    )
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/file",
        "SERVER_NAME": "testserver",
        "SERVER_PORT": "80",
        "wsgi.url_scheme": "http",
        "wsgi.file_wrapper": FileWrapper,
    }
    if with_span:
        with provider.get_tracer("t").start_as_current_span("outer", kind=trace.SpanKind.SERVER):
            body = middleware(environ, lambda status, headers, *exc: None)
    else:
        body = middleware(environ, lambda status, headers, *exc: None)
    assert isinstance(body, FileWrapper)
    assert middleware.core.writer.flush(5)
    assert len(middleware.core.get_store().list()) == 1
    [span] = server_spans(exporter)
    assert "otelprof.profile.url" in (span.attributes or {})


@pytest.mark.parametrize("order", ["otel_outside", "otel_inside", "otel_alone"])
def test_wsgi_body_closed_once_when_the_client_leaves_under_otel_wsgi(order: str) -> None:
    """A server closes a body it stopped iterating (the client left mid-stream). Under
    OTel's WSGI middleware, whose generator body closes what it iterates with ``yield
    from`` and then again in its ``finally``, the app's body must be closed once, as
    without us: ours, being its own iterator, was closed twice, and passed both calls on
    (``close()`` ran twice on the app's iterable)."""
    from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware

    closes: list[int] = []

    class Body:
        def __iter__(self) -> Any:
            for index in range(5):
                yield b"chunk %d" % index

        def close(self) -> None:
            closes.append(1)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Body()

    provider, _ = make_provider()
    settings: dict[str, Any] = {"profile_store": MemoryStore(), "sample_rate": 1.0}
    wsgi: Any
    if order == "otel_outside":
        wsgi = OpenTelemetryMiddleware(
            WSGIProfilingMiddleware(app, **settings), None, None, provider
        )
    elif order == "otel_inside":
        wsgi = WSGIProfilingMiddleware(
            OpenTelemetryMiddleware(app, None, None, provider), **settings
        )
    else:
        wsgi = OpenTelemetryMiddleware(app, None, None, provider)
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/stream",
        "SERVER_NAME": "testserver",
        "SERVER_PORT": "80",
        "wsgi.url_scheme": "http",
    }
    body = wsgi(environ, lambda status, headers, *exc: None)
    assert next(iter(body)) == b"chunk 0"
    body.close()  # the server, as the client went away
    assert len(closes) == 1


GC_CALLBACKS = """
    import gc, os
    for name in [name for name in os.environ if name.startswith("OTELPROF_")]:
        del os.environ[name]  # the package's own defaults
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    trace.set_tracer_provider(TracerProvider())
    import flask
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient
    before = list(gc.callbacks)
    from otelprof_middleware import ProfilingMiddleware, WSGIProfilingMiddleware

    asgi = Starlette(routes=[Route("/", lambda request: PlainTextResponse("ok"))])
    asgi.add_middleware(ProfilingMiddleware, store="memory://")  # the defaults: always-on
    with TestClient(asgi) as client:
        for _ in range(20):
            assert client.get("/").text == "ok"
    flask_app = flask.Flask(__name__)
    flask_app.get("/")(lambda: "ok")
    flask_app.wsgi_app = WSGIProfilingMiddleware(flask_app.wsgi_app, store="memory://")
    for _ in range(20):
        assert flask_app.test_client().get("/").text == "ok"
    gc.collect()
    print("default", gc.callbacks == before)
    flask_app.wsgi_app = WSGIProfilingMiddleware(
        flask_app.wsgi_app.app, store="memory://", mode="hook", sample_rate=1.0
    )
    assert flask_app.test_client().get("/").text == "ok"
    print("hook", len(gc.callbacks) == len(before) + 1)
"""


def test_only_a_thread_hook_adds_a_gc_callback() -> None:
    """The defaults leave ``gc.callbacks`` as they were (every collection would call ours);
    hook mode on a thread adds its one callback, which it needs."""
    result = run_script(GC_CALLBACKS)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["default", "True", "hook", "True"], result.stdout


@pytest.mark.parametrize("mode", MODES)
def test_patched_sleep_and_perf_counter_see_only_the_apps_calls(mode: str) -> None:
    """A user's test patches ``time.sleep`` (to skip a wait) or ``time.perf_counter`` (to
    fix a measured duration) around a request, then asserts on the mock: the calls are the
    app's alone. Our sampler thread slept with ``time.sleep``, so under the mock it spun
    (thousands of calls while the request lasted), and the request path's clock readings
    took the values meant for the app."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start = time.perf_counter()
        time.sleep(0.5)  # the mock returns at once
        threading.Event().wait(0.2)  # the request lasts: the sampler ticks meanwhile
        elapsed = time.perf_counter() - start
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [f"{elapsed:.2f}".encode()]

    provider, _ = make_provider()
    middleware = WSGIProfilingMiddleware(
        app, tracer_provider=provider, profile_store=MemoryStore(), mode=mode
    )
    environ: dict[str, Any] = {}
    setup_testing_defaults(environ)
    with (
        mock.patch("time.sleep") as sleep,
        mock.patch("time.perf_counter", side_effect=[10.0, 10.25]) as perf_counter,
    ):
        body = middleware(environ, lambda status, headers, exc_info=None: None)
        try:
            assert b"".join(body) == b"0.25"
        finally:
            body.close()  # type: ignore[attr-defined]
    assert sleep.call_args_list == [mock.call(0.5)]
    assert perf_counter.call_count == 2
    assert [name for name in counters() if name.startswith("failed.")] == []


def test_a_wsgi_app_does_not_load_the_asgi_side() -> None:
    """Importing the WSGI middleware (a Flask or Django WSGI app) loads neither the ASGI
    adapter nor OpenTelemetry's ASGI instrumentation and Starlette (20-35 ms of a Flask
    app's start-up); the ASGI names still resolve when asked for."""
    code = (
        "import sys\n"
        "from otelprof_middleware import WSGIProfilingMiddleware\n"
        "loaded = [m for m in ('otelprof_middleware.asgi', 'starlette',"
        " 'opentelemetry.instrumentation.asgi') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
        "import otelprof_middleware\n"
        "from otelprof_middleware.asgi import ProfilingMiddleware\n"
        "assert otelprof_middleware.ProfilingMiddleware is ProfilingMiddleware\n"
        "assert otelprof_middleware.asgi.ProfilingMiddleware is ProfilingMiddleware\n"
        "from otelprof_middleware import *\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
