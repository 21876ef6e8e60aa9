"""OTLP profiles end to end: real uvicorn and gunicorn servers, configured as a user would.

The servers get ``OTELPROF_OTLP_PROFILES=true`` and ``OTEL_EXPORTER_OTLP_ENDPOINT`` in
their environment and nothing else. No OTLP profiles receiver can be installed here, so
the endpoint is the local receiver of ``tests/otlp_receiver.py`` (a real HTTP server in
this process that decodes with opentelemetry-proto and checks the Collector's rules).
For every request, with its own marker function and a known trace id, the receiver must
get exactly one profile whose samples all link to that request's server span (as the
real SDK exported it), whose stacks hold its own marker and no other request's, and
whose sampled time is within 10% of the profile in otelprof's own store; one profile's
stacks are compared with the viewer's folded rendering of the stored one.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from otelprof_middleware._record import ProfileRecord
from otelprof_middleware.profiling._span import PROFILE_URL
from otelprof_middleware.stores.sqlite import SQLiteStore

from ..helpers import free_port
from ..otlp_receiver import OtlpReceiver, ReceivedProfile, profiles_of
from .servers import Server, fetch_profile, gunicorn, run_server, uvicorn

pytestmark = pytest.mark.e2e

MARKER = re.compile(r"marker_(\d+)")
REQUESTS = 16


def _env(receiver: OtlpReceiver, mode: str) -> dict[str, str]:
    return {
        "OTELPROF_OTLP_PROFILES": "true",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTELPROF_MODE": mode,
    }


def _send(server: Server, paths: list[str]) -> dict[str, int]:
    """GET each path with its own sampled trace id; returns trace id -> marker number."""

    def one(path: str) -> tuple[str, int]:
        trace_id = secrets.token_hex(16)
        headers = {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            response = client.get(path, params={"ms": 30}, headers=headers)
        assert response.status_code == 200, response.text
        match = MARKER.search("marker_" + path.rsplit("/", 1)[1])
        assert match is not None
        return trace_id, int(match.group(1))

    with ThreadPoolExecutor(8) as pool:
        return dict(pool.map(one, paths))


def _wait_for(receiver: OtlpReceiver, count: int, timeout: float = 20.0) -> list[ReceivedProfile]:
    deadline = time.monotonic() + timeout
    while True:
        profiles = profiles_of(receiver.requests())
        if len(profiles) >= count or time.monotonic() > deadline:
            return profiles
        time.sleep(0.1)


def _stored(server: Server, sent: dict[str, int]) -> dict[str, ProfileRecord]:
    store = SQLiteStore(str(server.state_dir / "profiles.db"))
    try:
        deadline = time.monotonic() + 15
        while True:
            found = {t: r[0] for t in sent if (r := store.get(t))}
            if len(found) == len(sent) or time.monotonic() > deadline:
                return found
            time.sleep(0.1)
    finally:
        store.close()


def _sampled(record: ProfileRecord) -> float:
    return sum(s for stack, s in record.session().frame_records if stack and s > 0)


def _check(server: Server, receiver: OtlpReceiver, sent: dict[str, int], mode: str) -> None:
    records = _stored(server, sent)
    assert set(records) == set(sent), "every request's profile is kept (keep-all)"
    # An always-on profile can get no tick under contention: nothing to export then.
    expected = {t for t, record in records.items() if _sampled(record) > 0}
    if mode == "hook":
        assert expected == set(sent)
    assert len(expected) >= len(sent) // 2
    profiles = _wait_for(receiver, len(expected))
    assert receiver.problems() == []
    by_trace: dict[str, list[ReceivedProfile]] = {}
    for profile in profiles:
        [(trace_id, _)] = profile.links()  # every sample of a profile: one span
        by_trace.setdefault(trace_id, []).append(profile)
    assert set(by_trace) == expected, "one profile per kept profile, none for others"
    spans = _spans_of(server, expected)
    own_marker = 0
    for trace_id in expected:
        n, record = sent[trace_id], records[trace_id]
        [profile] = by_trace[trace_id]
        span = spans[trace_id]
        assert profile.links() == {(trace_id, span["context"]["span_id"].removeprefix("0x"))}
        names = {name for frames, _ in profile.stacks() for name, _, _ in frames}
        markers = {int(m.group(1)) for name in names if (m := MARKER.fullmatch(name))}
        assert markers <= {n}, (n, sorted(names))  # never another request's marker
        own_marker += markers == {n}
        assert str(profile.resource["service.name"]).startswith("otelprof-e2e-honest")
        stored = _sampled(record)
        assert abs(profile.total_ns() / 1e9 - stored) <= 0.10 * stored, (
            profile.total_ns(),
            stored,
        )
        start = profile.profile.time_unix_nano
        assert abs(start - record.summary.start_time * 1e9) < 1e6  # the same request
    if mode == "hook":
        assert own_marker == len(sent)
    else:  # sampled every 5 ms: a 30 ms marker may miss its ticks under contention
        assert own_marker >= len(expected) // 2
    first = next(iter(sorted(expected)))
    _compare_with_viewer(spans[first], by_trace[first][0])


def _spans_of(server: Server, trace_ids: set[str], timeout: float = 15.0) -> dict[str, Any]:
    """The server spans of ``trace_ids``, waiting for the workers' span exports (each
    worker's batch processor writes on its own schedule)."""
    deadline = time.monotonic() + timeout
    while True:
        spans = {
            s["context"]["trace_id"].removeprefix("0x"): s
            for s in server.server_spans()
            if s["context"]["trace_id"].removeprefix("0x") in trace_ids
        }
        if set(spans) >= trace_ids or time.monotonic() > deadline:
            return spans
        time.sleep(0.2)


def _compare_with_viewer(span: dict[str, object], profile: ReceivedProfile) -> None:
    """The exported stacks and times are the stored profile's, as the viewer renders it."""
    attributes = span["attributes"]
    assert isinstance(attributes, dict)
    folded = fetch_profile(attributes[PROFILE_URL], "folded").text
    viewer: dict[tuple[str, ...], int] = {}
    for line in folded.splitlines():
        stack, _, weight = line.rpartition(" ")
        key = tuple(frame.split(" (")[0] for frame in stack.split(";"))
        viewer[key] = viewer.get(key, 0) + int(weight)
    exported: dict[tuple[str, ...], int] = {}
    d = profile.dictionary
    for sample in profile.profile.samples:
        key = tuple(
            d.string_table[
                d.function_table[
                    d.location_table[index].lines[0].function_index
                ].system_name_strindex
            ]
            for index in reversed(d.stack_table[sample.stack_index].location_indices)
        )
        exported[key] = exported.get(key, 0) + round(sum(sample.values) / 1000)
    assert set(exported) == set(viewer)
    for key, micros in viewer.items():
        assert abs(exported[key] - micros) <= max(2, micros // 100), key


@pytest.mark.parametrize("mode", ["hook", "always_on"])
def test_uvicorn_fastapi(tmp_path: Path, otlp_receiver: OtlpReceiver, mode: str) -> None:
    port = free_port()
    command = uvicorn("tests.e2e.honest_app:app", port, workers=2)
    with run_server(command, tmp_path, port=port, env=_env(otlp_receiver, mode)) as server:
        paths = [f"/async/{n}" if n % 2 else f"/def/{n}" for n in range(REQUESTS)]
        sent = _send(server, paths)
        _check(server, otlp_receiver, sent, mode)


@pytest.mark.parametrize("mode", ["hook", "always_on"])
def test_gunicorn_flask(tmp_path: Path, otlp_receiver: OtlpReceiver, mode: str) -> None:
    port = free_port()
    command = gunicorn("tests.e2e.honest_flask:app", port, workers=2, threads=4)
    with run_server(command, tmp_path, port=port, env=_env(otlp_receiver, mode)) as server:
        sent = _send(server, [f"/wsgi/{n}" for n in range(REQUESTS)])
        _check(server, otlp_receiver, sent, mode)


def test_a_dead_collector_fails_no_request(tmp_path: Path) -> None:
    """Nothing listens at the endpoint: every request answers 200 and keeps its profile
    while the exporter retries; the failure is logged once."""
    port, dead = free_port(), free_port()
    env = {
        "OTELPROF_OTLP_PROFILES": "true",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{dead}",
    }
    command = uvicorn("tests.e2e.honest_app:app", port, workers=1)
    with run_server(command, tmp_path, port=port, env=env) as server:
        sent = _send(server, [f"/async/{n}" for n in range(8)])
        assert set(_stored(server, sent)) == set(sent)
        # The batch is retried with backoff (about 15 s at most) before it counts as
        # failed. (uvicorn ends by re-raising SIGTERM, so nothing runs at exit: wait here.)
        deadline = time.monotonic() + 40
        while "otlp_profiles.push failed" not in server.log.read_text():
            assert time.monotonic() < deadline, server.log.read_text()
            time.sleep(0.5)
        sent_later = _send(server, [f"/async/{n}" for n in range(8, 12)])
        assert set(_stored(server, sent_later)) == set(sent_later)
    log = server.log.read_text()
    assert log.count("otlp_profiles.push failed") == 1, log
    assert "ConnectError" in log


SHUTDOWN_LOG = re.compile(
    r"otlp_profiles export: at shutdown, (\d+) profiles were still queued and (\d+) being sent"
)


@pytest.mark.parametrize("server_kind", ["uvicorn", "gunicorn"])
def test_at_sigterm_what_a_stuck_collector_holds_is_counted_and_logged(
    tmp_path: Path, otlp_receiver: OtlpReceiver, server_kind: str
) -> None:
    """The collector takes the first post and never answers: at SIGTERM the server exits
    within the exporter's few seconds, and says how many profiles were not sent. (uvicorn
    drains at the lifespan's end and then re-raises SIGTERM, so no atexit runs; gunicorn's
    worker closes the exporter at exit.) Before, they were lost without a word."""
    otlp_receiver.gate.clear()
    port = free_port()
    if server_kind == "uvicorn":
        command = uvicorn("tests.e2e.honest_app:app", port, workers=1)
        paths = [f"/async/{n}" for n in range(10)]
    else:
        command = gunicorn("tests.e2e.honest_flask:app", port, workers=1, threads=4)
        paths = [f"/wsgi/{n}" for n in range(10)]
    try:
        with run_server(command, tmp_path, port=port, env=_env(otlp_receiver, "hook")) as server:
            sent = _send(server, paths)
            assert set(_stored(server, sent)) == set(sent)
            started = time.monotonic()
            os.killpg(server.process.pid, signal.SIGTERM)
            server.process.wait(30)
            elapsed = time.monotonic() - started
    finally:
        otlp_receiver.gate.set()
    log = server.log.read_text()
    assert elapsed < 12, log
    match = SHUTDOWN_LOG.search(log)
    assert match is not None, log
    assert int(match.group(1)) + int(match.group(2)) == len(sent), log
    assert int(match.group(1)) > 0, log
