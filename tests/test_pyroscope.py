"""Pyroscope export, tested against a local HTTP receiver.

No Pyroscope server can be installed here, so the tests start a real ``http.server``
on 127.0.0.1 (``tests/pyroscope_receiver.py``) that checks each request against
Pyroscope's documented ingest API and decodes the body with protobuf's own runtime,
independently of the exporter's hand-written encoder.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from starlette.testclient import TestClient

from otelprof_middleware import Config, WSGIProfilingMiddleware
from otelprof_middleware._failsafe import snapshot
from otelprof_middleware._identifiers import thread_root
from otelprof_middleware.exporters import SpanFacts, open_exporter
from otelprof_middleware.exporters.pyroscope import (
    PyroscopeExporter,
    QueuedProfile,
    encode_pprof,
    ingest_name,
)
from otelprof_middleware.profiling._span import PROFILE_URL
from otelprof_middleware.stores import MemoryStore

from .exporter_inputs import (
    LOOPBACK,
    SPAN_ID,
    VIEW,
    exported_summary,
    item_app,
    sample_session,
)
from .helpers import free_port, make_provider, make_session, marker_alpha, server_spans
from .pyroscope_receiver import Receiver, decode, parse_name

PYROSCOPE_PROFILE_ID = "pyroscope.profile.id"  # the attribute Grafana reads


def test_encode_pprof_holds_the_stacks_leaf_first_with_wall_nanoseconds() -> None:
    item = QueuedProfile(
        exported_summary(), sample_session(), SpanFacts(name="GET /items/{item_id}")
    )
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
    first = QueuedProfile(exported_summary("1111111111111111"), sample_session(), SpanFacts())
    second = QueuedProfile(
        exported_summary("2222222222222222", route=""), sample_session(), SpanFacts()
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
    pyroscope_receiver: Receiver, exporters: list[Any]
) -> None:
    exporter = PyroscopeExporter(pyroscope_receiver.url + "/", tenant_id="team-a")
    exporters.append(exporter)
    span = SpanFacts(name="GET /items/{item_id}", service_name="checkout-api")
    assert exporter.submit(exported_summary(), sample_session(), span)
    assert exporter.flush(5)
    assert pyroscope_receiver.errors == []
    [request] = pyroscope_receiver.requests
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
    assert exporter.span_attributes(exported_summary()) == {"pyroscope.profile.id": SPAN_ID}


def test_credentials_in_the_url_become_basic_auth_and_are_never_logged(
    pyroscope_receiver: Receiver, exporters: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    pyroscope_receiver.status = 401
    netloc = pyroscope_receiver.url.removeprefix("http://")
    exporter = PyroscopeExporter(f"http://12345:s3cr%40t@{netloc}")
    exporters.append(exporter)
    assert exporter.submit(exported_summary(), sample_session(), SpanFacts())
    assert exporter.flush(5)
    [request] = pyroscope_receiver.requests
    assert request.headers["Authorization"] == "Basic MTIzNDU6czNjckB0"  # 12345:s3cr@t
    assert snapshot().get("pyroscope.failed") == 1
    assert "HTTP 401" in caplog.text
    assert "s3cr" not in caplog.text and "12345" not in caplog.text


def test_receiver_down_is_counted_and_never_raises(
    exporters: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    exporter = PyroscopeExporter(f"http://127.0.0.1:{free_port()}", timeout=2)
    exporters.append(exporter)
    with caplog.at_level(logging.WARNING, logger="otelprof_middleware"):
        accepted = sum(
            exporter.submit(exported_summary(), sample_session(), SpanFacts()) for _ in range(5)
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
    pyroscope_receiver: Receiver, exporters: list[Any]
) -> None:
    pyroscope_receiver.gate.clear()  # the receiver holds the first request: the thread is stuck
    exporter = PyroscopeExporter(pyroscope_receiver.url, queue_size=4, batch_size=1)
    exporters.append(exporter)
    results = [
        exporter.submit(exported_summary(), sample_session(), SpanFacts()) for _ in range(20)
    ]
    accepted = sum(results)
    assert 4 <= accepted <= 5  # the queue, plus at most the one the thread took
    assert snapshot().get("pyroscope.dropped.queue_full") == 20 - accepted
    pyroscope_receiver.gate.set()
    assert exporter.flush(10)
    assert snapshot().get("pyroscope.exported") == accepted
    assert pyroscope_receiver.errors == []


def test_profiles_waiting_for_the_receiver_count_against_the_samples_bound(
    pyroscope_receiver: Receiver, exporters: list[Any]
) -> None:
    pyroscope_receiver.gate.clear()  # a stalled receiver
    exporter = PyroscopeExporter(pyroscope_receiver.url, batch_size=1)
    exporters.append(exporter)
    session = sample_session()
    for _ in range(3):
        assert exporter.submit(exported_summary(), session, SpanFacts())
    # held from the queue until delivered: what QUEUED_SAMPLES bounds
    assert exporter.held_samples() == 3 * len(session.frame_records) > 0
    pyroscope_receiver.gate.set()
    assert exporter.flush(10)
    assert exporter.held_samples() == 0
    assert snapshot().get("pyroscope.exported") == 3


def test_after_close_profiles_are_dropped(exporters: list[Any]) -> None:
    exporter = PyroscopeExporter("http://127.0.0.1:9")
    exporters.append(exporter)
    exporter.close()
    assert not exporter.submit(exported_summary(), sample_session(), SpanFacts())
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


def test_asgi_kept_profile_reaches_pyroscope_and_the_span_says_so(
    pyroscope_receiver: Receiver,
) -> None:
    provider, spans = make_provider({"service.name": "checkout-api"})
    app = item_app(provider, pyroscope_url=pyroscope_receiver.url)
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
    assert pyroscope_receiver.errors == []
    [request] = pyroscope_receiver.requests
    assert parse_name(request.params["name"])[1] == {"service_name": "checkout-api"}
    decoded = decode(request.body)
    assert {labels["span_id"] for _, _, labels in decoded.stacks} == {span_id}
    assert {labels["http_route"] for _, _, labels in decoded.stacks} == {"/items/{item_id}"}
    assert any(name.startswith("marker_alpha ") for name in decoded.functions())


def test_export_is_off_by_default_and_sets_no_pyroscope_attribute() -> None:
    provider, spans = make_provider({"service.name": "checkout-api"})
    app = item_app(provider)
    assert app.core.exporter is None
    with TestClient(app, client=LOOPBACK) as client:
        assert client.get("/items/7").status_code == 200
    [span] = server_spans(spans)
    assert span.attributes is not None
    assert PROFILE_URL in span.attributes
    assert PYROSCOPE_PROFILE_ID not in span.attributes


def test_wsgi_receiver_down_leaves_the_request_alone_and_the_attribute_off_when_dropped() -> None:
    """Queue of one, receiver down: the span gets the attribute only if it was queued."""
    provider, spans = make_provider({"service.name": "checkout-api"})

    def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        marker_alpha(0.005)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    exporter = PyroscopeExporter(f"http://127.0.0.1:{free_port()}", queue_size=1)
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


def test_thread_roots_are_named_without_the_thread_id() -> None:
    """The thread's id was written into the root frame's name as its line
    (``MainThread (<thread>:140212345678912)``): one root per thread and process in
    Pyroscope's flame graph of a route, where one per thread name belongs."""
    session = make_session(
        [
            ([thread_root("MainThread", 140212345678912), VIEW], 0.010),
            ([thread_root("MainThread", 140212345999999), VIEW], 0.005),
        ],
        start_time=1_700_000_000.25,
        duration=0.05,
    )
    decoded = decode(encode_pprof([QueuedProfile(exported_summary(), session, SpanFacts())]))
    roots: dict[str, int] = {}
    for names, value, _ in decoded.stacks:
        roots[names[0]] = roots.get(names[0], 0) + value
    assert roots == {"MainThread (<thread>:0)": 15_000_000}
