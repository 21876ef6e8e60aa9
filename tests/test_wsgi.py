from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, Response, jsonify, stream_with_context
from opentelemetry import trace
from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware
from opentelemetry.trace import INVALID_SPAN, StatusCode
from werkzeug.test import Client as _Client
from werkzeug.test import EnvironBuilder

from otelprof_middleware import WSGIProfilingMiddleware, counters
from otelprof_middleware.profiling._span import PROFILE_URL
from otelprof_middleware.stores import MemoryStore

from .helpers import marker_alpha, marker_beta, server_spans, text_of

LOOPBACK = {"REMOTE_ADDR": "127.0.0.1"}


class Client(_Client):
    """werkzeug's test client, closing every body as a real WSGI server does."""

    def open(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("buffered", True)
        return super().open(*args, **kwargs)


def make_flask() -> Flask:
    app = Flask(__name__)

    @app.get("/items/<int:item_id>")
    def item(item_id: int) -> Response:
        marker_alpha(0.005)
        return jsonify(item_id=item_id)

    @app.get("/stream")
    def stream() -> Response:
        def body() -> Iterator[str]:
            for index in range(4):
                marker_beta(0.004)
                yield f"chunk{index}\n"

        return Response(body(), mimetype="text/plain")

    @app.get("/fail")
    def fail() -> Response:
        marker_alpha(0.003)
        raise RuntimeError("on purpose")

    return app


def profiled(
    app: Flask, otel: Any, store: MemoryStore, closing: list[WSGIProfilingMiddleware], **kw: Any
) -> WSGIProfilingMiddleware:
    kw.setdefault("sample_rate", 1.0)
    kw.setdefault("debug_route", True)
    middleware = WSGIProfilingMiddleware(
        app.wsgi_app, tracer_provider=otel[0], profile_store=store, **kw
    )
    app.wsgi_app = middleware  # type: ignore[method-assign]
    closing.append(middleware)
    return middleware


def test_flask_request_is_linked_and_stored(otel: Any, closing: list[Any]) -> None:
    store = MemoryStore()
    app = make_flask()
    middleware = profiled(app, otel, store, closing)
    client = Client(app)
    response = client.get("/items/5", environ_base=LOOPBACK)
    assert response.json == {"item_id": 5}
    middleware.core.writer.flush()
    [span] = server_spans(otel[1])
    assert span.attributes is not None
    url = str(span.attributes[PROFILE_URL])
    [summary] = store.list()
    assert summary.route == "/items/<int:item_id>"
    assert url == f"http://localhost/debug/profile/{summary.trace_id}?span_id={summary.span_id}"
    page = client.get(url.removeprefix("http://localhost") + "&format=text", environ_base=LOOPBACK)
    assert page.status_code == 200 and "marker_alpha" in page.text


def test_generator_body_profiled_until_close(otel: Any, closing: list[Any]) -> None:
    store = MemoryStore()
    app = make_flask()
    middleware = profiled(app, otel, store, closing)
    response = Client(app).get("/stream", environ_base=LOOPBACK)
    assert response.text == "".join(f"chunk{i}\n" for i in range(4))
    middleware.core.writer.flush()
    [summary] = store.list()
    assert "marker_beta" in text_of(store.get(summary.trace_id)[0].session())
    [span] = server_spans(otel[1])
    assert span.attributes is not None and PROFILE_URL in span.attributes


@pytest.mark.parametrize("mode", ["always_on", "hook"])
def test_a_response_left_open_does_not_stop_the_next_requests(
    otel: Any, closing: list[Any], mode: str
) -> None:
    """A response nobody closes (a warm-up through an unbuffered test client, say, made
    before gunicorn --preload forks its workers) leaves its request current on the
    thread until the garbage collector finds it: the requests served after it there are
    profiled all the same, not taken for requests nested in it."""
    store = MemoryStore()
    app = make_flask()
    middleware = profiled(app, otel, store, closing, mode=mode, min_duration_ms=0)
    left_open = _Client(app).get("/items/1", environ_base=LOOPBACK)  # never read or closed
    client = Client(app)
    for item in (2, 3):
        assert client.get(f"/items/{item}", environ_base=LOOPBACK).json == {"item_id": item}
    middleware.core.writer.flush()
    assert len(store.list()) == 2
    assert len([s for s in server_spans(otel[1]) if PROFILE_URL in (s.attributes or {})]) == 2
    left_open.close()
    middleware.core.writer.flush()
    assert len(store.list()) == 3


def test_flask_error_keeps_profile(otel: Any, closing: list[Any]) -> None:
    store = MemoryStore()
    app = make_flask()
    middleware = profiled(app, otel, store, closing)
    assert Client(app).get("/fail").status_code == 500
    middleware.core.writer.flush()
    [summary] = store.list()
    assert summary.status_code == 500
    assert "fail" in text_of(store.get(summary.trace_id)[0].session())


def test_joins_flask_instrumentor_and_otel_wsgi(otel: Any, closing: list[Any]) -> None:
    from opentelemetry.instrumentation.flask import FlaskInstrumentor

    store = MemoryStore()
    app = make_flask()
    FlaskInstrumentor.instrument_app(app, tracer_provider=otel[0])
    profiled(app, otel, store, closing)
    try:
        assert Client(app).get("/items/1").status_code == 200
        assert len(server_spans(otel[1])) == 1
    finally:
        FlaskInstrumentor.uninstrument_app(app)
    otel[1].clear()
    app2 = make_flask()
    inner = profiled(app2, otel, store, closing)
    outer = OpenTelemetryMiddleware(inner, tracer_provider=otel[0])
    assert Client(outer).get("/items/2").status_code == 200
    [span] = server_spans(otel[1])
    assert span.attributes is not None and PROFILE_URL in span.attributes


def test_flask_instrumentor_join_adds_nothing_to_the_environ(otel: Any, closing: list[Any]) -> None:
    """The view sees the environ keys it sees under FlaskInstrumentor alone: the joined
    profile is kept on Flask's request object, not in ``request.environ`` (it was, as
    ``otelprof.flask_profile``: an app dumping or copying its environ met our object)."""
    from flask import request
    from opentelemetry.instrumentation.flask import FlaskInstrumentor

    def environ_keys(wrap: bool) -> set[str]:
        app = make_flask()

        @app.get("/environ")
        def environ() -> Response:
            return jsonify(sorted(request.environ))

        FlaskInstrumentor.instrument_app(app, tracer_provider=otel[0])
        try:
            if wrap:
                profiled(app, otel, MemoryStore(), closing, min_duration_ms=0)
            keys = set(Client(app).get("/environ").get_json())
            if wrap:  # (the request was profiled under Flask's span)
                [span] = [s for s in server_spans(otel[1]) if s.name == "GET /environ"]
                assert span.attributes is not None and PROFILE_URL in span.attributes
            otel[1].clear()
            return keys
        finally:
            FlaskInstrumentor.uninstrument_app(app)

    assert environ_keys(wrap=True) == environ_keys(wrap=False)


def test_store_failure_changes_nothing(otel: Any, closing: list[Any]) -> None:
    class Broken(MemoryStore):
        def put(self, record: Any) -> None:
            raise OSError("read-only file system")

        def put_many(self, records: Any) -> None:  # (the writer batches when it can)
            raise OSError("read-only file system")

    plain = Client(make_flask())
    app = make_flask()
    middleware = profiled(app, otel, Broken(), closing)
    ours = Client(app)
    for path in ("/items/3", "/stream", "/fail", "/missing"):
        a, b = ours.get(path), plain.get(path)
        assert (a.status_code, a.data) == (b.status_code, b.data)
    middleware.core.writer.flush()
    from otelprof_middleware import counters

    assert counters()["failed.store.put"] == 4


def test_viewer_off_by_default_and_loopback_only(otel: Any, closing: list[Any]) -> None:
    app = make_flask()
    profiled(app, otel, MemoryStore(), closing, debug_route=False)
    assert Client(app).get("/debug/profile", environ_base=LOOPBACK).status_code == 404
    app2 = make_flask()
    profiled(app2, otel, MemoryStore(), closing)
    assert (
        Client(app2).get("/debug/profile", environ_base={"REMOTE_ADDR": "10.0.0.7"}).status_code
        == 403
    )
    assert Client(app2).get("/debug/profile/xyz", environ_base=LOOPBACK).status_code == 400


def make_failing_stream() -> Flask:
    app = Flask(__name__)

    @app.get("/broken-stream")
    def broken_stream() -> Response:
        def body() -> Iterator[str]:
            yield "first\n"
            marker_alpha(0.003)
            raise RuntimeError("the stream broke")

        return Response(body(), mimetype="text/plain")

    return app


@pytest.mark.parametrize("closes", [True, False], ids=["server-closes", "client-never-closes"])
def test_a_body_that_raises_mid_stream_is_a_failed_request(
    otel: Any, closing: list[Any], package_defaults: None, closes: bool
) -> None:
    """The app returned a streamed body whose iteration raised: the request failed, as
    if the app had raised. OpenTelemetry's own WSGI middleware gives its span an error
    status then; the keep policy keeps such a profile as ``error``."""
    store = MemoryStore()
    app = make_failing_stream()
    middleware = profiled(app, otel, store, closing, mode="hook")  # keep policy: not min_duration
    body = middleware({**EnvironBuilder(path="/broken-stream").get_environ(), **LOOPBACK}, _ignore)
    with pytest.raises(RuntimeError, match="the stream broke"):
        for _ in body:
            pass
    if closes:
        body.close()  # type: ignore[attr-defined]
    middleware.core.writer.flush()
    [span] = server_spans(otel[1])
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None and PROFILE_URL in span.attributes
    [summary] = store.list()
    assert "marker_alpha" in text_of(store.get(summary.trace_id)[0].session())
    assert counters().get("discarded.abandoned", 0) == 0


def _ignore(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
    return lambda data: None


def test_a_one_item_body_keeps_its_length_for_the_server(otel: Any, closing: list[Any]) -> None:
    """wsgiref (and waitress) set Content-Length for a body whose len() is 1: the body
    the middleware hands back must still have one."""
    import io
    from wsgiref.handlers import SimpleHandler

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"hello raw\n"]

    def served(wsgi_app: Any) -> bytes:
        out = io.BytesIO()
        environ = {**EnvironBuilder(path="/raw").get_environ(), **LOOPBACK}
        handler = SimpleHandler(io.BytesIO(), out, io.StringIO(), environ)
        handler.run(wsgi_app)
        lines = out.getvalue().split(b"\r\n")
        return b"\r\n".join(line for line in lines if not line.startswith(b"Date: "))

    middleware = WSGIProfilingMiddleware(app, tracer_provider=otel[0], profile_store=MemoryStore())
    closing.append(middleware)
    plain, ours = served(app), served(middleware)
    assert b"Content-Length: 10\r\n" in plain
    assert ours == plain


@pytest.mark.parametrize(
    ("error", "propagate"),
    [
        (RuntimeError("on purpose"), True),
        # gunicorn's sync worker raises SystemExit in the view when the request outlives
        # --timeout (tests/e2e/test_gunicorn_timeout.py runs that for real); Flask never
        # handles a BaseException, and no signal of Flask's comes with it.
        (SystemExit(1), False),
        (KeyboardInterrupt(), False),
    ],
    ids=["exception-propagated", "SystemExit", "KeyboardInterrupt"],
)
def test_an_app_that_raises_keeps_its_route(
    otel: Any, closing: list[Any], error: BaseException, propagate: bool
) -> None:
    """An error Flask lets through never calls ``start_response``, where the route is
    read otherwise, and Flask clears its request from the environ before the error reaches
    us: the kept error profile had an empty route and the span no ``http.route``. Flask
    propagates an ``Exception`` under ``PROPAGATE_EXCEPTIONS`` (on under ``flask run
    --debug``) and every ``BaseException``."""
    store = MemoryStore()
    app = make_flask()
    app.config["PROPAGATE_EXCEPTIONS"] = propagate

    @app.get("/boom/<int:n>")
    def boom(n: int) -> Response:
        marker_alpha(0.003)
        raise error

    middleware = profiled(app, otel, store, closing)
    with pytest.raises(type(error)):
        Client(app).get("/boom/7")
    middleware.core.writer.flush()
    [summary] = store.list()
    assert summary.route == "/boom/<int:n>"
    assert summary.status_code == 500
    [span] = server_spans(otel[1])
    assert span.status.status_code == StatusCode.ERROR
    assert span.name == "GET /boom/<int:n>"
    assert span.attributes is not None and span.attributes["http.route"] == "/boom/<int:n>"


def _open_files_under(directory: Path) -> list[str]:
    """The files under ``directory`` this process holds open (Linux's /proc)."""
    names = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(str(directory)):
                names.append(target)
    return names


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux's /proc")
def test_apps_built_one_after_another_share_the_store_connection(
    otel: Any, closing: list[Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A test suite that builds its app per test (Flask's app factory) with the middleware
    on, at the defaults: each app whose requests kept a profile opened the embedded store,
    and its SQLite connection (two open files) stayed open for the life of the process.
    Some 500 such tests ran out of file descriptors, and the app's own ``open()`` failed."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    for _ in range(12):
        app = make_flask()
        middleware = WSGIProfilingMiddleware(app.wsgi_app, tracer_provider=otel[0])
        app.wsgi_app = middleware  # type: ignore[method-assign]
        closing.append(middleware)
        assert Client(app).get("/fail").status_code == 500  # kept: it failed
        assert middleware.core.writer.flush()
    assert counters().get("written") == 12
    assert len(_open_files_under(tmp_path)) <= 3  # one connection: the file, -wal, -shm


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux's /proc")
def test_a_store_per_test_is_closed_with_its_app(otel: Any, tmp_path: Path) -> None:
    """A suite that gives each test's app a store of its own (``OTELPROF_STORE`` under the
    test's ``tmp_path``) kept every one open to the end of the process, three files each
    (the database, -wal, -shm): some 340 tests reach a 1024-descriptor limit, 80 macOS's
    256. A store goes when the last app using it does."""
    import gc

    for index in range(12):
        app = make_flask()
        middleware = WSGIProfilingMiddleware(
            app.wsgi_app, tracer_provider=otel[0], store=f"sqlite:///{tmp_path}/{index}/p.db"
        )
        app.wsgi_app = middleware  # type: ignore[method-assign]
        # kept (min_duration_ms=0 here); not /fail, whose traceback, logged by Flask, the
        # test's log capture holds with the middleware's frame until the test ends
        Client(app).get("/items/1").close()
        assert middleware.core.writer.flush()
        middleware.core.writer.close()  # (its thread ends: idle, or at testing.reset())
        del app, middleware
    gc.collect()
    assert counters().get("written") == 12
    assert _open_files_under(tmp_path) == []


def test_spans_made_while_a_body_streams_belong_to_the_request(
    otel: Any, closing: list[Any]
) -> None:
    """Under the server span the middleware opens, a streamed body (Flask's
    ``stream_with_context``, a CSV export that queries as it goes) runs in the span's
    context, as under OpenTelemetry's WSGI middleware: its spans are the request's
    children and its log records carry the trace id. They were roots of new traces."""
    provider, exporter = otel
    tracer = provider.get_tracer("app")
    app = Flask(__name__)

    @app.get("/export")
    def export() -> Response:
        def rows() -> Iterator[str]:
            for index in range(2):
                with tracer.start_as_current_span(f"fetch-{index}"):
                    yield f"row{index}\n"

        return Response(stream_with_context(rows()), mimetype="text/csv")

    middleware = WSGIProfilingMiddleware(
        app.wsgi_app, tracer_provider=provider, profile_store=MemoryStore()
    )
    app.wsgi_app = middleware  # type: ignore[method-assign]
    closing.append(middleware)
    assert Client(app).get("/export").text == "row0\nrow1\n"
    [server] = server_spans(exporter)
    fetches = [s for s in exporter.get_finished_spans() if s.name.startswith("fetch-")]
    assert len(fetches) == 2
    for span in fetches:
        assert span.parent is not None and span.parent.span_id == server.context.span_id
    assert trace.get_current_span() is INVALID_SPAN  # nothing left attached


def test_our_span_takes_a_bottle_style_route_rule(otel: Any, closing: list[Any]) -> None:
    """Bottle leaves the matched route in ``environ["bottle.route"]`` (its ``rule``), as
    Flask leaves its request there: our span was named ``GET`` alone and the profile had
    no route, for every Bottle route alike."""

    class BottleRoute:  # what Bottle's router puts in the environ
        rule = "/items/<item_id:int>"

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        environ["bottle.route"] = BottleRoute()  # as Bottle's router does
        if environ["PATH_INFO"].startswith("/mounted"):
            # Bottle's mount() shifts the path back when the mounted app returns, and
            # leaves "/", not "", in SCRIPT_NAME (and the mounted app's own route).
            environ["SCRIPT_NAME"] = "/"
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    store = MemoryStore()
    middleware = WSGIProfilingMiddleware(
        app, tracer_provider=otel[0], profile_store=store, sample_rate=1.0, min_duration_ms=0
    )
    closing.append(middleware)
    assert Client(middleware).get("/items/7").data == b"ok"
    assert Client(middleware).get("/mounted/items/7").data == b"ok"
    middleware.core.writer.flush()
    assert [s.route for s in store.list()] == ["/items/<item_id:int>"] * 2
    spans = server_spans(otel[1])
    assert [s.name for s in spans] == ["GET /items/<item_id:int>"] * 2


def test_a_pyramid_apps_route_names_our_span_and_profile(otel: Any, closing: list[Any]) -> None:
    """Pyramid keeps the matched route on its request object only: our span was named
    ``GET`` alone and the profile had no route, for every Pyramid route alike (a view that
    raises too)."""
    pyramid_config = pytest.importorskip("pyramid.config")
    from pyramid.response import Response as PyramidResponse

    def item(request: Any) -> Any:
        marker_alpha(0.002)
        return PyramidResponse(f"item {request.matchdict['item_id']}")

    def fail(request: Any) -> Any:
        raise RuntimeError("on purpose")

    with pyramid_config.Configurator() as config:
        config.add_route("item", "/items/{item_id}")
        config.add_view(item, route_name="item")
        config.add_route("fail", "/fail")
        config.add_view(fail, route_name="fail")
        pyramid_app = config.make_wsgi_app()
    store = MemoryStore()
    middleware = WSGIProfilingMiddleware(
        pyramid_app,
        tracer_provider=otel[0],
        profile_store=store,
        sample_rate=1.0,
        min_duration_ms=0,
    )
    closing.append(middleware)
    assert Client(middleware).get("/items/7").data == b"item 7"
    with pytest.raises(RuntimeError):
        Client(middleware).get("/fail")
    middleware.core.writer.flush()
    assert sorted(s.route for s in store.list()) == ["/fail", "/items/{item_id}"]
    assert sorted(s.name for s in server_spans(otel[1])) == ["GET /fail", "GET /items/{item_id}"]


def test_another_profilers_hook_is_left_alone(otel: Any, closing: list[Any]) -> None:
    """A profile function the app or a tool set on the thread (``sys.setprofile``, cProfile
    before 3.12) is neither replaced nor removed by a hook-mode request: that request is
    not profiled."""
    store = MemoryStore()
    app = make_flask()
    profiled(app, otel, store, closing, mode="hook")
    seen: list[str] = []

    def theirs(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            seen.append(frame.f_code.co_name)

    sys.setprofile(theirs)
    try:
        response = Client(app).get("/items/5", environ_base=LOOPBACK)
        still_theirs = sys.getprofile() is theirs
    finally:
        sys.setprofile(None)
    assert response.json == {"item_id": 5}
    assert still_theirs, "the request removed the other profiler's hook"
    assert "item" in seen and "marker_alpha" in seen
    assert counters().get("skipped.foreign_hook", 0) == 1


def test_a_profiler_of_every_thread_is_left_alone(otel: Any, closing: list[Any]) -> None:
    """yappi and memray profile every thread through ``threading.setprofile`` and a C
    profile function that ``sys.getprofile()`` does not show: while such a tool runs, a
    hook-mode request installs no hook of its own (it would replace theirs, then remove it)."""
    store = MemoryStore()
    app = make_flask()
    hooks: list[object] = []

    @app.get("/hook")
    def hook() -> Response:
        hooks.append(sys.getprofile())
        return jsonify(ok=True)

    profiled(app, otel, store, closing, mode="hook")
    threading.setprofile(lambda frame, event, arg: None)
    try:
        response = Client(app).get("/hook", environ_base=LOOPBACK)
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]
    assert response.json == {"ok": True}
    assert hooks == [None], "a hook was installed over the other profiler's"
    assert counters().get("skipped.foreign_hook", 0) == 1


@pytest.mark.parametrize(
    ("variables", "excluded"),
    [
        ({"OTEL_PYTHON_EXCLUDED_URLS": "items/2"}, True),
        ({"OTEL_PYTHON_WSGI_EXCLUDED_URLS": "items/2"}, True),
        ({"OTEL_PYTHON_EXCLUDED_URLS": "items/2", "OTEL_PYTHON_WSGI_EXCLUDED_URLS": "x"}, False),
        ({}, False),
    ],
)
def test_the_span_we_open_honours_otels_excluded_urls(
    otel: Any,
    closing: list[Any],
    monkeypatch: pytest.MonkeyPatch,
    variables: dict[str, str],
    excluded: bool,
) -> None:
    """No instrumentor in the app (granian or gunicorn serving a plain WSGI app under
    opentelemetry-instrument): ours is the request's only span, and the URLs OTel's
    instrumentations are told to leave out get none, so no profile either."""
    for name in ("OTEL_PYTHON_EXCLUDED_URLS", "OTEL_PYTHON_WSGI_EXCLUDED_URLS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    app = make_flask()
    store = MemoryStore()
    middleware = profiled(app, otel, store, closing, min_duration_ms=0)
    client = Client(app)
    assert [client.get(p).status_code for p in ("/items/1", "/items/2")] == [200, 200]
    middleware.core.writer.flush(timeout=5.0)
    targets = {(s.attributes or {}).get("http.target") for s in server_spans(otel[1])}
    assert targets == ({"/items/1"} if excluded else {"/items/1", "/items/2"})
    assert len(store.list()) == len(targets)
