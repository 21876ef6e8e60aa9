"""OTLP profiles export, tested against a local OTLP/HTTP receiver.

No OTLP profiles receiver can be installed here (see ``tests/otlp_receiver.py``): the
receiver is a real HTTP server on 127.0.0.1 that decodes each body with
opentelemetry-proto's generated classes and checks it against the Collector's and
Pyroscope's rules. Spans come from a real SDK ``TracerProvider`` with an in-memory span
exporter; profiles from real requests through the middleware.
"""

from __future__ import annotations

import logging
import random
import sys
import threading
import time
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from starlette.testclient import TestClient

from otelprof_middleware import Config, WSGIProfilingMiddleware
from otelprof_middleware._failsafe import snapshot
from otelprof_middleware._identifiers import thread_root
from otelprof_middleware.exporters import SpanFacts, open_exporter
from otelprof_middleware.exporters._http import QueuedProfile, RetryPolicy, retry_after
from otelprof_middleware.exporters.otlp import (
    SIGNAL_PATH,
    OtlpProfilesExporter,
    OtlpProfilesSettings,
    encode_request,
    parse_headers,
    settings_from_env,
)
from otelprof_middleware.profiling._settings import load_config
from otelprof_middleware.profiling._span import PROFILE_URL, PYROSCOPE_PROFILE_ID
from otelprof_middleware.stores import MemoryStore

from .exporter_inputs import (
    LOOPBACK,
    ROOT,
    SPAN_ID,
    TRACE_ID,
    VIEW,
    WORK,
    exported_summary,
    item_app,
    sample_session,
)
from .helpers import free_port, make_provider, make_session, marker_alpha, server_spans
from .otlp_receiver import OtlpReceiver, Reply, profiles_of, violations

FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.05, budget=5.0)


def exporter_for(
    exporters: list[OtlpProfilesExporter], endpoint: str, **kwargs: Any
) -> OtlpProfilesExporter:
    kwargs.setdefault("retry", FAST_RETRY)
    exporter = OtlpProfilesExporter(
        OtlpProfilesSettings(endpoint=endpoint, timeout=kwargs.pop("timeout", 5.0)), **kwargs
    )
    exporters.append(exporter)
    return exporter


def queued(span_id: str = SPAN_ID, **resource: object) -> QueuedProfile:
    attributes = {"service.name": "checkout-api", **resource}
    return QueuedProfile(
        exported_summary(span_id),
        sample_session(),
        SpanFacts("GET /items/{item_id}", None, attributes),
    )


# --- settings ----------------------------------------------------------------------------


def test_endpoint_defaults_and_the_signal_path() -> None:
    assert settings_from_env({}).endpoint == "http://localhost:4318/v1development/profiles"
    base = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"}
    assert settings_from_env(base).endpoint == "http://collector:4318" + SIGNAL_PATH
    prefixed = {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://gw.example.com/otlp"}
    assert settings_from_env(prefixed).endpoint == "https://gw.example.com/otlp" + SIGNAL_PATH
    own = {**base, "OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT": "http://p:4040/custom"}
    assert settings_from_env(own).endpoint == "http://p:4040/custom"  # used as given


def test_headers_timeout_and_compression_follow_the_otlp_variables() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Basic%20abc,x-scope-orgid=general",
        "OTEL_EXPORTER_OTLP_PROFILES_HEADERS": " X-Scope-OrgID = team-a , api-key=k%3Dv ,",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "2500",
        "OTEL_EXPORTER_OTLP_PROFILES_COMPRESSION": "GZIP",
        "OTEL_EXPORTER_OTLP_PROFILES_PROTOCOL": "http/protobuf",
    }
    settings = settings_from_env(env)
    # The profiles variable replaces the general one, as for every OTLP signal.
    assert settings.headers == {"x-scope-orgid": "team-a", "api-key": "k=v"}
    assert settings.timeout == 2.5  # milliseconds, as the OTLP specification says
    assert settings.compression == "gzip"
    env.pop("OTEL_EXPORTER_OTLP_PROFILES_HEADERS")
    assert settings_from_env(env).headers == {
        "authorization": "Basic abc",
        "x-scope-orgid": "general",
    }


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"OTEL_EXPORTER_OTLP_PROFILES_HEADERS": "token-secret-123"}, "PROFILES_HEADERS"),
        ({"OTEL_EXPORTER_OTLP_HEADERS": "bad key=secret-123"}, "OTLP_HEADERS"),
        ({"OTEL_EXPORTER_OTLP_HEADERS": "a=secret-123%0D%0Ax-evil=1"}, "OTLP_HEADERS"),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "soon"}, "OTLP_TIMEOUT"),
        ({"OTEL_EXPORTER_OTLP_PROFILES_TIMEOUT": "-5"}, "PROFILES_TIMEOUT"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
        ({"OTEL_EXPORTER_OTLP_PROFILES_PROTOCOL": "http/json"}, "PROFILES_PROTOCOL"),
        ({"OTEL_EXPORTER_OTLP_COMPRESSION": "zstd"}, "OTLP_COMPRESSION"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"}, "OTLP_ENDPOINT"),
        ({"OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT": "ftp://u:secret-123@h"}, "PROFILES_ENDPOINT"),
        # urlsplit's own errors ("Invalid IPv6 URL") and ports that are no port
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://u:secret-123@[::1"}, "OTLP_ENDPOINT"),
        ({"OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT": "http://c:99999/x"}, "PROFILES_ENDPOINT"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://u:secret-123@c:4318a"}, "OTLP_ENDPOINT"),
    ],
)
def test_bad_variables_are_named_and_secrets_never_echoed(env: dict[str, str], named: str) -> None:
    with pytest.raises(ValueError, match=named) as info:
        settings_from_env(env)
    assert "secret-123" not in str(info.value)


def test_header_values_are_percent_decoded_and_blank_entries_skipped() -> None:
    assert parse_headers("X", "a=1,,b=%C3%A9%20x") == {"a": "1", "b": "é x"}
    assert parse_headers("X", "") == {}


def test_the_setting_turns_the_export_on_and_is_off_by_default() -> None:
    assert Config.load({}).otlp_profiles is False
    config = Config.load({"OTELPROF_OTLP_PROFILES": "yes", "OTELPROF_OTLP_PROFILES_PYROSCOPE": "1"})
    assert config.otlp_profiles and config.otlp_profiles_pyroscope
    assert open_exporter(None) is None
    exporter = open_exporter(
        None,
        otlp_profiles=True,
        environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"},
    )
    try:
        assert isinstance(exporter, OtlpProfilesExporter)
        assert exporter.endpoint == "http://127.0.0.1:9" + SIGNAL_PATH
    finally:
        assert exporter is not None
        exporter.close()


def test_a_bad_variable_turns_profiling_off_loudly_at_start_up(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROFILES_PROTOCOL", "grpc")
    with caplog.at_level(logging.ERROR, logger="otelprof_middleware"):
        config = load_config({"otlp_profiles": True}, has_store=True)
    assert config.enabled is False
    assert "OTEL_EXPORTER_OTLP_PROFILES_PROTOCOL" in caplog.text
    assert snapshot().get("disabled.invalid_setting") == 1


def test_without_the_extra_the_error_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The extra is installed here; a None entry in sys.modules makes its import fail
    # exactly as it fails where opentelemetry-proto is missing.
    monkeypatch.setitem(sys.modules, "opentelemetry.proto.profiles.v1development", None)
    with caplog.at_level(logging.ERROR, logger="otelprof_middleware"):
        config = load_config({"otlp_profiles": True}, has_store=True)
    assert config.enabled is False
    assert "OTELPROF_OTLP_PROFILES" in caplog.text
    assert "otelprof-middleware[otlp]" in caplog.text
    # Off, the extra is never imported: the package works without it.
    assert load_config({}, has_store=True).enabled is True


# --- encoding ----------------------------------------------------------------------------


def test_the_request_follows_the_dictionary_rules() -> None:
    request = encode_request([queued(), queued("00f067aa0ba902b8")])
    assert violations(request) == []
    d = request.dictionary
    # Index 0 of every table is the zero value, so 0 means "not set".
    assert d.string_table[0] == ""
    for table in (d.mapping_table, d.location_table, d.function_table, d.link_table):
        assert table[0].ByteSize() == 0
    assert d.stack_table[0].ByteSize() == 0 and d.attribute_table[0].ByteSize() == 0
    # No duplicates: two profiles with the same frames share functions and stacks.
    names = [d.string_table[f.name_strindex] for f in list(d.function_table)[1:]]
    assert sorted(names) == ["ItemView.get", "[await]", "crunch", "handle"]
    assert len(d.link_table) == 3  # zero + one per span


def test_the_validator_catches_broken_requests() -> None:
    """The rules can fail: a request that breaks them is reported."""
    request = encode_request([queued()])
    broken = ExportProfilesServiceRequest()
    broken.CopyFrom(request)
    del broken.dictionary.link_table[0]  # the zero entry gone: link 1 is now out of range
    broken.dictionary.string_table[0] = "x"
    sample = broken.resource_profiles[0].scope_profiles[0].profiles[0].samples[0]
    sample.values.append(1)
    found = violations(broken)
    assert any("link index" in p for p in found)
    assert any("string_table[0]" in p for p in found)
    assert any("2 values" in p for p in found)
    assert violations(ExportProfilesServiceRequest()) == ["no dictionary"]


def test_stacks_values_times_and_links_of_one_profile() -> None:
    [received] = profiles_of([encode_request([queued()])])
    profile = received.profile
    assert (
        received.string(profile.sample_type.type_strindex),
        received.string(profile.sample_type.unit_strindex),
    ) == ("wall", "nanoseconds")
    assert received.string(profile.period_type.type_strindex) == "wall"
    assert profile.period == 1_000_000  # the 1 ms interval
    assert profile.time_unix_nano == 1_700_000_000_250_000_000
    assert profile.duration_nano == 50_000_000
    assert len(profile.profile_id) == 16 and any(profile.profile_id)
    assert received.links() == {(TRACE_ID, SPAN_ID)}
    assert received.resource == {"service.name": "checkout-api"}
    assert received.scope_name == "otelprof_middleware"
    assert received.attributes() == {
        "http.request.method": "GET",
        "http.response.status_code": 200,
        "http.route": "/items/{item_id}",
    }
    stacks = {tuple(name for name, _, _ in frames): value for frames, value in received.stacks()}
    assert stacks == {
        ("handle", "ItemView.get", "crunch"): 12_000_000,
        ("handle", "ItemView.get"): 3_000_000,
        ("handle", "ItemView.get", "[await]"): 20_000_000,
    }
    frames = received.stacks()[0][0]
    assert frames[1] == ("ItemView.get", "/srv/app/views.py", 25)  # the line being run
    function = received.dictionary.function_table[
        received.dictionary.location_table[
            received.dictionary.stack_table[profile.samples[0].stack_index].location_indices[0]
        ]
        .lines[0]
        .function_index
    ]
    assert received.string(function.system_name_strindex) == "crunch"
    assert function.start_line == 30
    # Leaf first in Stack.location_indices, as the proto says.
    assert frames[-1][0] == "crunch"


def test_profiles_of_different_resources_get_their_own_resource_profiles() -> None:
    request = encode_request([queued(), queued("00f067aa0ba902b8", **{"service.name": "other"})])
    assert violations(request) == []
    services = sorted(p.resource["service.name"] for p in profiles_of([request]))
    assert services == ["checkout-api", "other"]
    assert len(request.resource_profiles) == 2


def test_retry_after_reads_seconds_and_http_dates() -> None:
    def response(value: str) -> httpx.Response:
        return httpx.Response(503, headers={"Retry-After": value})

    assert retry_after(response("7")) == 7.0
    assert retry_after(response("Wed, 21 Oct 2015 07:28:00 GMT"), now=1445412470.0) == 10.0
    assert retry_after(response("Wed, 21 Oct 2015 07:28:00 GMT"), now=1445412490.0) == 0.0
    assert retry_after(response("soon")) is None
    assert retry_after(httpx.Response(503)) is None


def test_retry_backoff_leaves_the_apps_random_sequence_alone() -> None:
    """An app (or its test) that seeds Python's global ``random`` gets its sequence, however
    many exporter retries ran meanwhile: the jitter has a generator of its own."""
    policy = RetryPolicy(max_attempts=4, initial_backoff=1.0, max_backoff=4.0)
    random.seed(7)
    expected = [random.random() for _ in range(3)]
    random.seed(7)
    waits = [policy.backoff(attempt) for attempt in (1, 2, 3)]
    assert [random.random() for _ in range(3)] == expected
    assert [0.5 <= wait / step <= 1.0 for wait, step in zip(waits, (1, 2, 4), strict=True)] == [
        True,
        True,
        True,
    ]


# --- delivery and its faults ----------------------------------------------------------


def test_headers_from_the_variables_replace_ours_in_any_case(
    otlp_receiver: OtlpReceiver, exporters: list[OtlpProfilesExporter]
) -> None:
    """The variables' header names are lowercased, ours were not: a ``user-agent`` (or a
    stray ``content-type``) from OTEL_EXPORTER_OTLP_HEADERS went out beside our own, two
    headers of one name, and the receiver read the first: the User-Agent was not replaced,
    and a content-type made it answer 400 to every batch."""
    exporter = OtlpProfilesExporter(
        OtlpProfilesSettings(
            endpoint=otlp_receiver.endpoint,
            headers={"user-agent": "gateway-client/1", "content-type": "application/json"},
        )
    )
    exporters.append(exporter)
    assert exporter.submit(exported_summary(), sample_session(), queued().span)
    assert exporter.flush(10)
    [received] = otlp_receiver.received
    assert received.problems == []
    assert received.headers["User-Agent"] == "gateway-client/1"
    assert received.headers["Content-Type"] == "application/x-protobuf"


def test_delivery_posts_protobuf_to_the_signal_path(
    otlp_receiver: OtlpReceiver, exporters: list[OtlpProfilesExporter]
) -> None:
    exporter = OtlpProfilesExporter(
        OtlpProfilesSettings(
            endpoint=otlp_receiver.endpoint,
            headers={"authorization": "Bearer t0ken"},
            compression="gzip",
        )
    )
    exporters.append(exporter)
    assert exporter.submit(exported_summary(), sample_session(), queued().span)
    assert exporter.flush(10)
    [received] = otlp_receiver.received
    assert received.problems == []
    assert received.headers["Content-Type"] == "application/x-protobuf"
    assert received.headers["Content-Encoding"] == "gzip"
    assert received.headers["authorization"] == "Bearer t0ken"
    assert received.headers["User-Agent"].startswith("otelprof-middleware/")
    assert snapshot().get("otlp_profiles.exported") == 1


def test_400_is_dropped_and_not_retried(
    otlp_receiver: OtlpReceiver,
    exporters: list[OtlpProfilesExporter],
    caplog: pytest.LogCaptureFixture,
) -> None:
    otlp_receiver.replies = [Reply(400), Reply(400)]
    exporter = exporter_for(exporters, otlp_receiver.endpoint)
    with caplog.at_level(logging.WARNING, logger="otelprof_middleware"):
        assert exporter.submit(exported_summary(), sample_session(), queued().span)
        assert exporter.flush(10)
    assert len(otlp_receiver.received) == 1
    counters = snapshot()
    assert counters.get("otlp_profiles.failed") == 1
    assert counters.get("otlp_profiles.retried", 0) == 0
    assert counters.get("otlp_profiles.exported", 0) == 0
    assert "HTTP 400" in caplog.text


def test_503_then_200_is_retried_and_delivered(
    otlp_receiver: OtlpReceiver, exporters: list[OtlpProfilesExporter]
) -> None:
    otlp_receiver.replies = [Reply(503), Reply(429, {"Retry-After": "0"}), Reply(200)]
    exporter = exporter_for(exporters, otlp_receiver.endpoint)
    assert exporter.submit(exported_summary(), sample_session(), queued().span)
    assert exporter.flush(10)
    assert len(otlp_receiver.received) == 3
    bodies = [r.request.SerializeToString() for r in otlp_receiver.received if r.request]
    assert len(set(bodies)) == 1  # the same request each time (same profile id)
    counters = snapshot()
    assert counters.get("otlp_profiles.retried") == 2
    assert counters.get("otlp_profiles.exported") == 1
    assert counters.get("otlp_profiles.failed", 0) == 0


def test_retries_stop_at_the_attempt_limit_and_a_retry_after_beyond_the_budget(
    otlp_receiver: OtlpReceiver, exporters: list[OtlpProfilesExporter]
) -> None:
    otlp_receiver.replies = [Reply(502)] * 4
    exporter = exporter_for(exporters, otlp_receiver.endpoint)
    exporter.submit(exported_summary(), sample_session(), queued().span)
    assert exporter.flush(10)
    assert len(otlp_receiver.received) == FAST_RETRY.max_attempts
    assert snapshot().get("otlp_profiles.failed") == 1
    otlp_receiver.replies = [Reply(429, {"Retry-After": "3600"})]
    exporter.submit(exported_summary(), sample_session(), queued().span)
    assert exporter.flush(10)
    assert len(otlp_receiver.received) == FAST_RETRY.max_attempts + 1  # gave up at once
    assert snapshot().get("otlp_profiles.failed") == 2


def test_close_ends_a_retry_wait(
    otlp_receiver: OtlpReceiver, exporters: list[OtlpProfilesExporter]
) -> None:
    otlp_receiver.replies = [Reply(503, {"Retry-After": "20"})]
    slow = RetryPolicy(max_attempts=3, budget=60.0)
    exporter = exporter_for(exporters, otlp_receiver.endpoint, retry=slow)
    exporter.submit(exported_summary(), sample_session(), queued().span)
    deadline = time.monotonic() + 10
    while not otlp_receiver.received and time.monotonic() < deadline:
        time.sleep(0.01)
    exporter.close(10)  # returns once the waiting thread gave up
    assert not [t for t in threading.enumerate() if t.name == "otelprof-otlp-profiles"]
    assert len(otlp_receiver.received) == 1
    assert snapshot().get("otlp_profiles.failed") == 1


def test_close_counts_and_logs_the_profiles_a_stuck_receiver_left_queued(
    otlp_receiver: OtlpReceiver,
    exporters: list[OtlpProfilesExporter],
    caplog: pytest.LogCaptureFixture,
) -> None:
    otlp_receiver.gate.clear()  # the receiver holds the first post: the thread is stuck
    exporter = exporter_for(exporters, otlp_receiver.endpoint, batch_size=1)
    for n in range(4):
        assert exporter.submit(
            exported_summary(f"00f067aa0ba902c{n}"), sample_session(), SpanFacts()
        )
    deadline = time.monotonic() + 10
    while exporter._sending == 0 and time.monotonic() < deadline:
        time.sleep(0.01)  # the first profile is being sent
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="otelprof_middleware"):
        exporter.close(0.3)
    assert time.monotonic() - started < 3  # bounded, whatever the receiver does
    assert snapshot().get("otlp_profiles.dropped.shutdown") == 3
    assert "at shutdown, 3 profiles were still queued and 1 being sent" in caplog.text
    assert "dropped, counted as otlp_profiles.dropped.shutdown" in caplog.text
    otlp_receiver.gate.set()  # the post in flight completes; the other three never go
    deadline = time.monotonic() + 10
    while [t for t in threading.enumerate() if t.name == "otelprof-otlp-profiles"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert len(otlp_receiver.received) == 1
    assert snapshot().get("otlp_profiles.exported") == 1


def test_close_in_time_drops_nothing(
    otlp_receiver: OtlpReceiver,
    exporters: list[OtlpProfilesExporter],
    caplog: pytest.LogCaptureFixture,
) -> None:
    exporter = exporter_for(exporters, otlp_receiver.endpoint, batch_size=1)
    for n in range(4):
        exporter.submit(exported_summary(f"00f067aa0ba902c{n}"), sample_session(), SpanFacts())
    with caplog.at_level(logging.WARNING, logger="otelprof_middleware"):
        exporter.close(10)
    assert snapshot().get("otlp_profiles.exported") == 4
    assert "otlp_profiles.dropped.shutdown" not in snapshot()
    assert "at shutdown" not in caplog.text


def test_partial_success_counts_the_rejected_and_logs_once(
    otlp_receiver: OtlpReceiver,
    exporters: list[OtlpProfilesExporter],
    caplog: pytest.LogCaptureFixture,
) -> None:
    otlp_receiver.replies = [Reply(rejected=1, message="sample too old")] * 2
    exporter = exporter_for(exporters, otlp_receiver.endpoint, batch_size=2)
    otlp_receiver.gate.clear()  # hold the first request so the next two make one batch
    with caplog.at_level(logging.WARNING, logger="otelprof_middleware"):
        for n in range(3):
            assert exporter.submit(
                exported_summary(f"00f067aa0ba902c{n}"), sample_session(), SpanFacts()
            )
        otlp_receiver.gate.set()
        assert exporter.flush(10)
    counters = snapshot()
    assert counters.get("otlp_profiles.rejected") == 2
    assert counters.get("otlp_profiles.exported") == 1
    assert counters.get("otlp_profiles.retried", 0) == 0  # partial success: never retried
    assert caplog.text.count("sample too old") == 1


def test_a_full_queue_drops_and_counts_without_waiting(
    otlp_receiver: OtlpReceiver, exporters: list[OtlpProfilesExporter]
) -> None:
    otlp_receiver.gate.clear()  # the receiver holds the first request: the thread is stuck
    exporter = exporter_for(exporters, otlp_receiver.endpoint, queue_size=3, batch_size=1)
    accepted = sum(
        exporter.submit(exported_summary(), sample_session(), SpanFacts()) for _ in range(20)
    )
    assert 3 <= accepted <= 4  # the queue, plus at most the one the thread took
    assert snapshot().get("otlp_profiles.dropped.queue_full") == 20 - accepted
    otlp_receiver.gate.set()
    assert exporter.flush(10)
    assert snapshot().get("otlp_profiles.exported") == accepted
    assert otlp_receiver.problems() == []


# --- through the middleware ----------------------------------------------------------------


def _provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    return make_provider({"service.name": "checkout-api", "deployment.environment": "t"})


def test_asgi_each_sample_links_to_the_request_span(
    otlp_receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_receiver.url)
    provider, spans = _provider()
    app = item_app(provider, otlp_profiles=True)
    exporter = app.core.exporter
    assert isinstance(exporter, OtlpProfilesExporter)
    try:
        with TestClient(app, client=LOOPBACK) as client:
            before = time.time_ns()
            assert client.get("/items/7").status_code == 200
            assert client.get("/items/8").status_code == 200
            after = time.time_ns()
        assert exporter.flush(10)
    finally:
        exporter.close(5)
    assert otlp_receiver.problems() == []
    received = profiles_of(otlp_receiver.requests())
    recorded = server_spans(spans)
    assert len(received) == len(recorded) == 2
    by_span = {
        (format(s.context.trace_id, "032x"), format(s.context.span_id, "016x")): s for s in recorded
    }
    for profile in received:
        [link] = profile.links()  # every sample links to one span: its request's
        span = by_span[link]
        assert span.attributes is not None
        assert PROFILE_URL in span.attributes
        assert PYROSCOPE_PROFILE_ID not in span.attributes  # off unless asked for
        marker = [
            frame
            for frames, _ in profile.stacks()
            for frame in frames
            if frame[0] == "marker_alpha"
        ]
        assert marker and {path for _, path, _ in marker} == {marker_alpha.__code__.co_filename}
        assert all(line > marker_alpha.__code__.co_firstlineno for _, _, line in marker)
        start, duration = profile.profile.time_unix_nano, profile.profile.duration_nano
        assert span.start_time is not None and span.end_time is not None
        assert before <= start and start + duration <= after
        assert span.start_time - 1_000_000 <= start <= span.end_time
        assert profile.resource["service.name"] == "checkout-api"
        assert profile.resource["deployment.environment"] == "t"
        assert profile.attributes()["http.route"] == "/items/{item_id}"
        assert profile.total_ns() > 15_000_000  # the 20 ms marker, at least mostly
    assert {link for p in received for link in p.links()} == set(by_span)


def test_the_pyroscope_attribute_only_when_asked_and_accepted(
    otlp_receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT", otlp_receiver.endpoint)
    provider, spans = _provider()
    app = item_app(provider, otlp_profiles=True, otlp_profiles_pyroscope=True)
    exporter = app.core.exporter
    assert exporter is not None
    try:
        with TestClient(app, client=LOOPBACK) as client:
            assert client.get("/items/7").status_code == 200
        exporter.close(5)  # closed: the next profile is dropped, its span gets nothing
        with TestClient(app, client=LOOPBACK) as client:
            assert client.get("/items/8").status_code == 200
    finally:
        exporter.close(5)
    first, second = server_spans(spans)
    assert first.attributes is not None and second.attributes is not None
    assert first.attributes[PYROSCOPE_PROFILE_ID] == format(first.context.span_id, "016x")
    assert PYROSCOPE_PROFILE_ID not in second.attributes
    assert snapshot().get("otlp_profiles.dropped.closed") == 1


def test_a_stuck_or_dead_collector_never_holds_a_request(
    otlp_receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Requests finish while the receiver holds the export; a dead one is counted, logged once."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_receiver.url)
    provider, _ = _provider()
    app = item_app(provider, otlp_profiles=True)
    exporter = app.core.exporter
    assert exporter is not None
    otlp_receiver.gate.clear()  # every export now hangs in the receiver until the gate opens
    try:
        with TestClient(app, client=LOOPBACK) as client:
            for n in range(3):  # would block here if the request path waited for export
                assert client.get(f"/items/{n}").status_code == 200
        assert not otlp_receiver.gate.is_set()
    finally:
        otlp_receiver.gate.set()
        assert exporter.flush(10)
        exporter.close(5)
    assert snapshot().get("otlp_profiles.exported") == 3

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    dead = item_app(provider, otlp_profiles=True)
    assert isinstance(dead.core.exporter, OtlpProfilesExporter)
    dead.core.exporter._retry = FAST_RETRY  # keep the test short; the rule is the same
    try:
        with caplog.at_level(logging.WARNING, logger="otelprof_middleware"):
            with TestClient(dead, client=LOOPBACK) as client:
                for n in range(4):
                    assert client.get(f"/items/{n}").status_code == 200
            assert dead.core.exporter.flush(20)
    finally:
        dead.core.exporter.close(5)
    counters = snapshot()
    assert counters.get("otlp_profiles.failed") == 4
    assert counters.get("failed.otlp_profiles.push", 0) >= 1
    assert counters.get("otlp_profiles.retried", 0) >= 1  # connection refused is retried
    assert caplog.text.count("otlp_profiles.push failed") == 1


def test_a_lifespan_end_with_a_stuck_collector_says_what_is_unsent_and_keeps_it(
    otlp_receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """uvicorn ends the process right after the lifespan (it re-raises SIGTERM): what
    the exporter still holds then is counted and logged. The process may also go on (a
    test client): the profiles stay queued and are sent when the receiver answers."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_receiver.url)
    provider, _ = _provider()
    app = item_app(provider, otlp_profiles=True)
    exporter = app.core.exporter
    assert exporter is not None
    otlp_receiver.gate.clear()
    try:
        with (
            caplog.at_level(logging.WARNING, logger="otelprof_middleware"),
            TestClient(app, client=LOOPBACK) as client,
        ):
            for n in range(3):
                assert client.get(f"/items/{n}").status_code == 200
        unsent = snapshot().get("otlp_profiles.unsent.shutdown", 0)
        assert unsent >= 1  # the first post may hold one or more of the three
        assert f"at shutdown, {unsent} profiles were still queued and {3 - unsent} being" in (
            caplog.text
        )
        assert "lost if the process exits now" in caplog.text
    finally:
        otlp_receiver.gate.set()
    assert exporter.flush(10)
    exporter.close(5)
    assert snapshot().get("otlp_profiles.exported") == 3


def test_wsgi_profiles_link_to_their_spans(
    otlp_receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_receiver.url)
    provider, spans = _provider()

    def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        marker_alpha(0.01)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    app = WSGIProfilingMiddleware(
        wsgi_app, tracer_provider=provider, profile_store=MemoryStore(), otlp_profiles=True
    )
    from werkzeug.test import Client

    try:
        client = Client(app)
        for _ in range(2):
            response = client.get("/x", environ_base={"REMOTE_ADDR": "127.0.0.1"})
            assert response.status_code == 200 and response.data == b"ok"
        assert app.core.exporter is not None and app.core.exporter.flush(10)
    finally:
        assert app.core.exporter is not None
        app.core.exporter.close(5)
    assert otlp_receiver.problems() == []
    links = {link for p in profiles_of(otlp_receiver.requests()) for link in p.links()}
    expected = {
        (format(s.context.trace_id, "032x"), format(s.context.span_id, "016x"))
        for s in server_spans(spans)
    }
    assert links == expected and len(expected) == 2


def _dropping_provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    """A provider whose sampler records nothing (as ``TraceIdRatioBased`` does for most
    traces), with the app's resource."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(
        resource=Resource.create({"service.name": "checkout-api"}), sampler=ALWAYS_OFF
    )
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


@pytest.mark.parametrize("adapter", ["asgi", "wsgi"])
def test_a_triggered_profile_of_an_unsampled_trace_carries_the_apps_resource(
    otlp_receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch, adapter: str
) -> None:
    """The trigger header profiles a request the sampler did not record. Its span is an
    API ``NonRecordingSpan`` with no resource: the profile went out with an empty
    resource (no ``service.name``, so no service in Pyroscope) and the index said
    ``unknown_service``. The app's provider has the resource."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_receiver.url)
    provider, spans = _dropping_provider()
    settings: dict[str, Any] = {"otlp_profiles": True, "debug_route": True}
    if adapter == "asgi":
        app: Any = item_app(provider, **settings)
        with TestClient(app, client=LOOPBACK) as client:
            assert client.get("/items/1", headers={"x-otelprof": "1"}).status_code == 200
    else:

        def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            marker_alpha(0.01)
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok"]

        app = WSGIProfilingMiddleware(
            wsgi_app, tracer_provider=provider, profile_store=MemoryStore(), **settings
        )
        from werkzeug.test import Client

        response = Client(app).get(
            "/x", headers={"x-otelprof": "1"}, environ_base={"REMOTE_ADDR": "127.0.0.1"}
        )
        assert response.status_code == 200 and response.data == b"ok"
    exporter = app.core.exporter
    assert exporter is not None
    try:
        assert exporter.flush(10) and app.core.writer.flush(10)
    finally:
        exporter.close(5)
    assert spans.get_finished_spans() == ()  # nothing recorded, as the sampler said
    [profile] = profiles_of(otlp_receiver.requests())
    assert profile.resource["service.name"] == "checkout-api"
    [summary] = app.core.get_store().list()
    assert summary.service == "checkout-api"


def test_pyroscope_and_otlp_together_each_get_every_profile(
    otlp_receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_receiver.url)
    provider, spans = _provider()
    app = item_app(provider, otlp_profiles=True, pyroscope_url=f"http://127.0.0.1:{free_port()}")
    exporter = app.core.exporter
    assert exporter is not None and not isinstance(exporter, OtlpProfilesExporter)
    try:
        with TestClient(app, client=LOOPBACK) as client:
            assert client.get("/items/7").status_code == 200
        assert exporter.flush(10)
    finally:
        exporter.close(5)
    [span] = server_spans(spans)
    assert span.attributes is not None
    assert span.attributes[PYROSCOPE_PROFILE_ID] == format(span.context.span_id, "016x")
    assert len(profiles_of(otlp_receiver.requests())) == 1
    counters = snapshot()
    assert counters.get("otlp_profiles.exported") == 1
    assert counters.get("pyroscope.failed") == 1  # nobody listens there
    assert not [t for t in threading.enumerate() if t.name == "otelprof-pyroscope"]


def test_a_profile_without_samples_is_not_sent_and_sets_no_attribute(
    otlp_receiver: OtlpReceiver, exporters: list[OtlpProfilesExporter]
) -> None:
    exporter = exporter_for(exporters, otlp_receiver.endpoint, pyroscope_span_attribute=True)
    empty = make_session(
        [([], 0.01), ([ROOT], 0.0)],
        start_time=1_700_000_000.25,
        duration=0.05,
        interval=0.005,
        sample_count=0,
        target_description="no tick",
    )
    assert not exporter.submit(exported_summary(), empty, SpanFacts())
    assert exporter.submit(exported_summary(), sample_session(), SpanFacts())
    assert exporter.flush(10)
    assert len(profiles_of(otlp_receiver.requests())) == 1
    counters = snapshot()
    assert counters.get("otlp_profiles.skipped.no_samples") == 1
    assert counters.get("otlp_profiles.exported") == 1


def test_a_timeout_that_looks_like_seconds_is_read_as_milliseconds_and_warned_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    env = {"OTEL_EXPORTER_OTLP_TIMEOUT": "7"}
    with caplog.at_level(logging.WARNING, logger="otelprof_middleware"):
        assert settings_from_env(env).timeout == 0.007
        assert settings_from_env(env).timeout == 0.007
    assert caplog.text.count("read as milliseconds") == 1


def test_thread_roots_are_exported_without_the_thread_id() -> None:
    """An always-on stack starts at its thread's root frame, which carries the thread's id
    (``threading.get_ident()``, a pointer-sized number) where a line number goes: it was
    sent as that function's start line and its location's line (140212345678912), and two
    threads of one name were two functions, so Pyroscope's flame graph of a route split
    at the root per worker thread and process."""
    first, second = (
        thread_root("AnyIO worker thread", ident) for ident in (140212345678912, 140212345999999)
    )
    session = make_session(
        [([first, VIEW, WORK], 0.010), ([second, VIEW, WORK], 0.005)],
        start_time=1_700_000_000.25,
        duration=0.05,
    )
    item = QueuedProfile(exported_summary(), session, SpanFacts("GET /x", None, {}))
    [received] = profiles_of([encode_request([item])])
    stacks = received.stacks()
    root = ("AnyIO worker thread", "<thread>", 0)
    view, work = ("ItemView.get", "/srv/app/views.py", 25), ("crunch", "/srv/app/work.py", 33)
    assert [tuple(frames) for frames, _ in stacks] == [(root, view, work)]
    assert sum(value for _, value in stacks) == 15_000_000
    functions = received.dictionary.function_table
    assert max(function.start_line for function in functions) < 1000
