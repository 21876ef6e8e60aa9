"""Pyroscope export, tested against a local HTTP receiver.

No Pyroscope server can be installed here, so the tests start a real ``http.server``
on 127.0.0.1 that checks each request against Pyroscope's documented ingest API
(``POST /ingest``, required ``name``/``from``/``until``, the ``name`` label-set grammar
of ``api/model/labelset`` in grafana/pyroscope, ``format=pprof`` with a gzipped pprof
body) and decodes the body with protobuf's own runtime, from a descriptor of pprof's
``profile.proto`` written here, independently of the exporter's hand-written encoder.
"""

from __future__ import annotations

import gzip
import logging
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pyinstrument.session import Session
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from otelprof_middleware import Config, ProfilingMiddleware, WSGIProfilingMiddleware
from otelprof_middleware._failsafe import snapshot
from otelprof_middleware._record import ProfileSummary
from otelprof_middleware.exporters import SpanFacts, open_exporter
from otelprof_middleware.exporters.pyroscope import (
    PyroscopeExporter,
    QueuedProfile,
    encode_pprof,
    ingest_name,
)
from otelprof_middleware.profiling._span import PROFILE_URL
from otelprof_middleware.stores import MemoryStore

from .helpers import marker_alpha, server_spans

descriptor_pb2 = pytest.importorskip("google.protobuf.descriptor_pb2")
message_factory = pytest.importorskip("google.protobuf.message_factory")
descriptor_pool = pytest.importorskip("google.protobuf.descriptor_pool")

LOOPBACK = ("127.0.0.1", 50000)
PYROSCOPE_PROFILE_ID = "pyroscope.profile.id"  # the attribute Grafana reads
SPAN_ID = "00f067aa0ba902b7"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"

# --- pprof decoding with the protobuf runtime --------------------------------------


def _profile_class() -> Any:
    """The ``Profile`` message class of pprof's profile.proto (the fields we send)."""
    f = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="otelprof_test_profile.proto", package="t")
    file.syntax = "proto3"

    def message(name: str, *fields: tuple[str, int, int, int, str]) -> None:
        msg = file.message_type.add(name=name)
        for field_name, number, kind, label, type_name in fields:
            entry = msg.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                entry.type_name = type_name

    one, many = f.LABEL_OPTIONAL, f.LABEL_REPEATED
    i64, u64, s, m = f.TYPE_INT64, f.TYPE_UINT64, f.TYPE_STRING, f.TYPE_MESSAGE
    message("ValueType", ("type", 1, i64, one, ""), ("unit", 2, i64, one, ""))
    message("Label", ("key", 1, i64, one, ""), ("str", 2, i64, one, ""))
    message(
        "Sample",
        ("location_id", 1, u64, many, ""),
        ("value", 2, i64, many, ""),
        ("label", 3, m, many, ".t.Label"),
    )
    message("Line", ("function_id", 1, u64, one, ""), ("line", 2, i64, one, ""))
    message("Location", ("id", 1, u64, one, ""), ("line", 4, m, many, ".t.Line"))
    message(
        "Function",
        ("id", 1, u64, one, ""),
        ("name", 2, i64, one, ""),
        ("system_name", 3, i64, one, ""),
        ("filename", 4, i64, one, ""),
        ("start_line", 5, i64, one, ""),
    )
    message(
        "Profile",
        ("sample_type", 1, m, many, ".t.ValueType"),
        ("sample", 2, m, many, ".t.Sample"),
        ("location", 4, m, many, ".t.Location"),
        ("function", 5, m, many, ".t.Function"),
        ("string_table", 6, s, many, ""),
        ("time_nanos", 9, i64, one, ""),
        ("duration_nanos", 10, i64, one, ""),
        ("period_type", 11, m, one, ".t.ValueType"),
        ("period", 12, i64, one, ""),
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("t.Profile"))


Profile = _profile_class()


@dataclass
class Decoded:
    """A decoded pprof, with stacks as function names (root first)."""

    raw: Any
    strings: list[str]
    stacks: list[tuple[list[str], int, dict[str, str]]]  # names root first, value, labels
    lines: list[tuple[str, int]]  # (function name, line) of every location

    def functions(self) -> set[str]:
        return {name for names, _, _ in self.stacks for name in names}


def decode(body: bytes) -> Decoded:
    raw = Profile.FromString(gzip.decompress(body) if body[:2] == b"\x1f\x8b" else body)
    strings = list(raw.string_table)
    functions = {fn.id: strings[fn.name] for fn in raw.function}
    locations = {loc.id: loc for loc in raw.location}
    stacks = []
    for sample in raw.sample:
        names = [functions[locations[i].line[0].function_id] for i in sample.location_id]
        labels = {strings[label.key]: strings[label.str] for label in sample.label}
        stacks.append((list(reversed(names)), sample.value[0], labels))
    lines = [(functions[loc.line[0].function_id], loc.line[0].line) for loc in raw.location]
    return Decoded(raw, strings, stacks, lines)


# --- a receiver that checks Pyroscope's documented ingest request ---------------------

_APP = re.compile(r"[A-Za-z0-9_.\-/]+")
_LABEL_NAME = re.compile(r"[A-Za-z0-9_.]+")


def parse_name(name: str) -> tuple[str, dict[str, str]]:
    """Pyroscope's ``name`` grammar: ``app{key=value,...}``; raises ValueError."""
    app, brace, rest = name.partition("{")
    if not _APP.fullmatch(app.strip()):
        raise ValueError(f"invalid application name {app!r}")
    labels: dict[str, str] = {}
    if brace:
        if not rest.endswith("}"):
            raise ValueError("unterminated label set")
        for pair in filter(None, rest[:-1].split(",")):
            key, eq, value = pair.partition("=")
            if not eq or not _LABEL_NAME.fullmatch(key.strip()):
                raise ValueError(f"invalid label {pair!r}")
            labels[key.strip()] = value.strip()
    return app.strip(), labels


@dataclass
class Received:
    path: str
    params: dict[str, str]
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    url: str
    requests: list[Received] = field(default_factory=list)
    status: int = 200
    gate: threading.Event = field(default_factory=threading.Event)
    errors: list[str] = field(default_factory=list)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(url="")
    state.gate.set()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            state.gate.wait(10)
            parts = urlsplit(self.path)
            params = {k: v[0] for k, v in parse_qs(parts.query).items()}
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            problem = None
            try:
                if parts.path != "/ingest":
                    problem = f"path {parts.path}"
                elif not {"name", "from", "until"} <= params.keys():
                    problem = f"missing required parameters: {sorted(params)}"
                else:
                    parse_name(params["name"])
                    if not params["from"].isdigit() or not params["until"].isdigit():
                        problem = "from/until must be UNIX seconds"
                    elif params.get("format") == "pprof":
                        decode(body)
            except Exception as exc:
                problem = repr(exc)
            if problem:
                state.errors.append(problem)
            state.requests.append(Received(parts.path, params, dict(self.headers), body))
            status = 400 if problem else state.status
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.gate.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def exporters() -> Iterator[list[PyroscopeExporter]]:
    made: list[PyroscopeExporter] = []
    yield made
    for exporter in made:
        exporter.close(5)
    assert not [t for t in threading.enumerate() if t.name == "otelprof-pyroscope"]


# --- known inputs --------------------------------------------------------------------

ROOT = "handle\x00/srv/app/server.py\x0010\x01l12"
VIEW = "get\x00/srv/app/views.py\x0020\x01cItemView\x01l25"
WORK = "crunch\x00/srv/app/work.py\x0030\x01l33"


def make_session(records: list[tuple[list[str], float]], duration: float = 0.05) -> Session:
    return Session(
        frame_records=records,
        start_time=1_700_000_000.25,
        duration=duration,
        min_interval=0.001,
        max_interval=0.001,
        sample_count=len(records),
        start_call_stack=[],
        target_description="test",
        cpu_time=0.0,
        sys_path=["/srv"],
        sys_prefixes=[],
    )


def make_summary(span_id: str = SPAN_ID, route: str = "/items/{item_id}") -> ProfileSummary:
    return ProfileSummary(
        trace_id=TRACE_ID,
        span_id=span_id,
        method="GET",
        route=route,
        status_code=200,
        duration_ms=50.0,
        start_time=1_700_000_000.25,
    )


def sample_session() -> Session:
    return make_session(
        [
            ([ROOT, VIEW, WORK], 0.010),
            ([ROOT, VIEW, WORK], 0.002),  # same stack: summed
            ([ROOT, VIEW], 0.003),
            ([ROOT, VIEW, "[await]"], 0.020),
        ]
    )


def test_encode_pprof_holds_the_stacks_leaf_first_with_wall_nanoseconds() -> None:
    item = QueuedProfile(make_summary(), sample_session(), SpanFacts(name="GET /items/{item_id}"))
    decoded = decode(encode_pprof([item]))
    raw, strings = decoded.raw, decoded.strings
    assert strings[0] == ""
    assert [(strings[t.type], strings[t.unit]) for t in raw.sample_type] == [
        ("wall", "nanoseconds")
    ]
    assert (strings[raw.period_type.type], strings[raw.period_type.unit]) == ("wall", "nanoseconds")
    assert raw.period == 1_000_000
    assert raw.time_nanos == 1_700_000_000_250_000_000
    assert raw.duration_nanos == 50_000_000
    view = "ItemView.get (app/views.py:20)"  # paths shortened against sys.path
    by_stack = {tuple(names): value for names, value, _ in decoded.stacks}
    assert by_stack == {
        ("handle (app/server.py:10)", view, "crunch (app/work.py:30)"): 12_000_000,
        ("handle (app/server.py:10)", view): 3_000_000,
        ("handle (app/server.py:10)", view, "[await]"): 20_000_000,
    }
    # Locations carry the line being executed, functions their first line.
    assert (view, 25) in decoded.lines and ("crunch (app/work.py:30)", 33) in decoded.lines
    assert {fn.start_line for fn in raw.function} >= {10, 20, 30}
    for _, _, labels in decoded.stacks:
        assert labels == {
            "span_id": SPAN_ID,
            "span_name": "GET /items/{item_id}",
            "http_route": "/items/{item_id}",
        }


def test_encode_pprof_keeps_spans_apart_in_one_batch() -> None:
    first = QueuedProfile(make_summary("1111111111111111"), sample_session(), SpanFacts())
    second = QueuedProfile(
        make_summary("2222222222222222", route=""), sample_session(), SpanFacts()
    )
    decoded = decode(encode_pprof([first, second]))
    totals: dict[str, int] = {}
    for _, value, labels in decoded.stacks:
        totals[labels["span_id"]] = totals.get(labels["span_id"], 0) + value
        assert "span_name" not in labels
        assert ("http_route" in labels) == (labels["span_id"] == "1111111111111111")
    assert totals == {"1111111111111111": 35_000_000, "2222222222222222": 35_000_000}
    assert len(decoded.raw.function) == 4  # interned once for both profiles


@pytest.mark.parametrize(
    ("service", "expected"),
    [
        ("checkout-api", "checkout-api{service_name=checkout-api}"),
        ("shop api,{v2}", "shop_api__v2_{service_name=shop api__v2_}"),
        ("", "unknown_service{service_name=unknown_service}"),
    ],
)
def test_ingest_name_always_parses(service: str, expected: str) -> None:
    assert ingest_name(service) == expected
    parse_name(expected)


def test_posts_the_documented_ingest_request(
    receiver: Receiver, exporters: list[PyroscopeExporter]
) -> None:
    exporter = PyroscopeExporter(receiver.url + "/", tenant_id="team-a")
    exporters.append(exporter)
    span = SpanFacts(name="GET /items/{item_id}", service_name="checkout-api")
    assert exporter.submit(make_summary(), sample_session(), span)
    assert exporter.flush(5)
    assert receiver.errors == []
    [request] = receiver.requests
    assert request.path == "/ingest"
    assert parse_name(request.params["name"]) == ("checkout-api", {"service_name": "checkout-api"})
    assert request.params["format"] == "pprof"
    assert request.params["spyName"] == "otelprof"
    assert int(request.params["from"]) == 1_700_000_000
    assert int(request.params["until"]) == 1_700_000_001
    assert request.headers["X-Scope-OrgID"] == "team-a"
    assert request.headers["Content-Type"] == "application/octet-stream"
    assert "Authorization" not in request.headers
    decoded = decode(request.body)
    assert {labels["span_id"] for _, _, labels in decoded.stacks} == {SPAN_ID}
    assert snapshot().get("pyroscope.exported") == 1
    assert exporter.span_attributes(make_summary()) == {"pyroscope.profile.id": SPAN_ID}


def test_credentials_in_the_url_become_basic_auth_and_are_never_logged(
    receiver: Receiver, exporters: list[PyroscopeExporter], caplog: pytest.LogCaptureFixture
) -> None:
    receiver.status = 401
    netloc = receiver.url.removeprefix("http://")
    exporter = PyroscopeExporter(f"http://12345:s3cr%40t@{netloc}")
    exporters.append(exporter)
    assert exporter.submit(make_summary(), sample_session(), SpanFacts())
    assert exporter.flush(5)
    [request] = receiver.requests
    assert request.headers["Authorization"] == "Basic MTIzNDU6czNjckB0"  # 12345:s3cr@t
    assert snapshot().get("pyroscope.failed") == 1
    assert "HTTP 401" in caplog.text
    assert "s3cr" not in caplog.text and "12345" not in caplog.text


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # nothing listens there once the socket is closed


def test_receiver_down_is_counted_and_never_raises(
    exporters: list[PyroscopeExporter], caplog: pytest.LogCaptureFixture
) -> None:
    exporter = PyroscopeExporter(f"http://127.0.0.1:{_closed_port()}", timeout=2)
    exporters.append(exporter)
    with caplog.at_level(logging.WARNING, logger="otelprof_middleware"):
        accepted = sum(
            exporter.submit(make_summary(), sample_session(), SpanFacts()) for _ in range(5)
        )
        assert exporter.flush(10)
    assert accepted == 5
    counters = snapshot()
    assert counters.get("pyroscope.failed") == 5
    assert counters.get("failed.pyroscope.push", 0) >= 1
    assert counters.get("pyroscope.exported", 0) == 0
    # Logged once per interval, not once per failure.
    assert caplog.text.count("pyroscope.push failed") == 1


def test_a_full_queue_drops_and_counts_without_waiting(
    receiver: Receiver, exporters: list[PyroscopeExporter]
) -> None:
    receiver.gate.clear()  # the receiver holds the first request: the thread is stuck
    exporter = PyroscopeExporter(receiver.url, queue_size=4, batch_size=1)
    exporters.append(exporter)
    results = [exporter.submit(make_summary(), sample_session(), SpanFacts()) for _ in range(20)]
    accepted = sum(results)
    assert 4 <= accepted <= 5  # the queue, plus at most the one the thread took
    assert snapshot().get("pyroscope.dropped.queue_full") == 20 - accepted
    receiver.gate.set()
    assert exporter.flush(10)
    assert snapshot().get("pyroscope.exported") == accepted
    assert receiver.errors == []


def test_after_close_profiles_are_dropped(exporters: list[PyroscopeExporter]) -> None:
    exporter = PyroscopeExporter("http://127.0.0.1:9")
    exporters.append(exporter)
    exporter.close()
    assert not exporter.submit(make_summary(), sample_session(), SpanFacts())
    assert snapshot().get("pyroscope.dropped.closed") == 1


def test_bad_urls_are_refused() -> None:
    with pytest.raises(ValueError, match="absolute http"):
        PyroscopeExporter("pyroscope:4040")
    with pytest.raises(ValueError, match="OTELPROF_PYROSCOPE_URL") as info:
        Config.load({}, pyroscope_url="ftp://user:hunter2@host")
    assert "hunter2" not in str(info.value)
    assert open_exporter(None) is None
    env = {"OTELPROF_PYROSCOPE_URL": "http://p:4040", "OTELPROF_PYROSCOPE_TENANT_ID": "t1"}
    config = Config.load(env)
    assert (config.pyroscope_url, config.pyroscope_tenant_id) == ("http://p:4040", "t1")


def test_span_facts_read_the_sdk_span() -> None:
    provider = TracerProvider(resource=Resource.create({"service.name": "checkout-api"}))
    with provider.get_tracer("t").start_as_current_span("GET /items/{item_id}") as span:
        assert SpanFacts.of(span) == SpanFacts("GET /items/{item_id}", "checkout-api")
    from opentelemetry.trace import INVALID_SPAN

    assert SpanFacts.of(INVALID_SPAN) == SpanFacts()


# --- through the middleware ------------------------------------------------------------


async def item(request: Request) -> JSONResponse:
    marker_alpha(0.02)
    return JSONResponse({"id": request.path_params["item_id"]})


def _provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "checkout-api"}))
    provider.add_span_processor(SimpleSpanProcessor(spans))
    return provider, spans


def test_asgi_kept_profile_reaches_pyroscope_and_the_span_says_so(receiver: Receiver) -> None:
    provider, spans = _provider()
    app = ProfilingMiddleware(
        Starlette(routes=[Route("/items/{item_id}", item)]),
        tracer_provider=provider,
        profile_store=MemoryStore(),
        sample_rate=1.0,
        pyroscope_url=receiver.url,
    )
    exporter = app.core.exporter
    assert isinstance(exporter, PyroscopeExporter)
    try:
        with TestClient(app, client=LOOPBACK) as client:
            assert client.get("/items/7").status_code == 200
        assert exporter.flush(5)
    finally:
        exporter.close(5)
    [span] = server_spans(spans)
    span_id = format(span.context.span_id, "016x")
    assert span.attributes is not None
    assert span.attributes[PYROSCOPE_PROFILE_ID] == span_id
    assert PROFILE_URL in span.attributes
    assert receiver.errors == []
    [request] = receiver.requests
    assert parse_name(request.params["name"])[1] == {"service_name": "checkout-api"}
    decoded = decode(request.body)
    assert {labels["span_id"] for _, _, labels in decoded.stacks} == {span_id}
    assert {labels["http_route"] for _, _, labels in decoded.stacks} == {"/items/{item_id}"}
    assert any(name.startswith("marker_alpha ") for name in decoded.functions())


def test_export_is_off_by_default_and_sets_no_pyroscope_attribute() -> None:
    provider, spans = _provider()
    app = ProfilingMiddleware(
        Starlette(routes=[Route("/items/{item_id}", item)]),
        tracer_provider=provider,
        profile_store=MemoryStore(),
        sample_rate=1.0,
    )
    assert app.core.exporter is None
    with TestClient(app, client=LOOPBACK) as client:
        assert client.get("/items/7").status_code == 200
    [span] = server_spans(spans)
    assert span.attributes is not None
    assert PROFILE_URL in span.attributes
    assert PYROSCOPE_PROFILE_ID not in span.attributes


def test_wsgi_receiver_down_leaves_the_request_alone_and_the_attribute_off_when_dropped() -> None:
    """Queue of one, receiver down: the span gets the attribute only if it was queued."""
    provider, spans = _provider()

    def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        marker_alpha(0.005)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    exporter = PyroscopeExporter(f"http://127.0.0.1:{_closed_port()}", queue_size=1)
    gate = threading.Event()
    original_send = exporter._send

    def slow_send(client: Any, items: Any) -> None:
        gate.wait(10)
        original_send(client, items)

    exporter._send = slow_send  # type: ignore[method-assign]
    app = WSGIProfilingMiddleware(
        wsgi_app, tracer_provider=provider, profile_store=MemoryStore(), sample_rate=1.0
    )
    app.core.keeper.exporter = exporter
    from werkzeug.test import Client

    try:
        client = Client(app)
        for _ in range(4):
            response = client.get("/x", environ_base={"REMOTE_ADDR": "127.0.0.1"})
            assert response.status_code == 200 and response.data == b"ok"
        gate.set()
        assert exporter.flush(10)
    finally:
        gate.set()
        exporter.close(5)
    marked = [s for s in server_spans(spans) if PYROSCOPE_PROFILE_ID in (s.attributes or {})]
    counters = snapshot()
    dropped = counters.get("pyroscope.dropped.queue_full", 0)
    assert 1 <= len(marked) <= 2 and len(marked) + dropped == 4
    assert counters.get("pyroscope.failed") == len(marked)
