"""Issue 4's measurement: what fraction of each marker's known time is in its own profile.

Each request asks for 30 ms of wall-clock spinning in its marker; the known time is how
long the marker actually ran, which the app reports in its response. Under contention a
marker runs past its deadline (it notices the deadline only once it holds the GIL again:
60 ms and more with 8 threads spinning), so measured against the requested 30 ms a profile
that missed part of it could still read 100%, and one that over-counted could not be told
from an overrun. Against the marker's own time, both show: the tests hold a floor and,
per case, a ceiling on the median.

Real uvicorn (one worker, so every request shares one event loop) and gunicorn gthread
(8 threads). Each request calls its own uniquely named marker function for a known
wall-clock time; the stored pyinstrument session is read back from the store and the
time under that marker summed. A profile must hold >= 90% of its own marker's time and
no other request's marker. The per-case figures go to test-artifacts/honest-profiles.md.
"""

from __future__ import annotations

import os
import secrets
import socket
import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest

from otelprof_middleware import ProfileRecord
from otelprof_middleware.stores import SQLiteStore

from ..helpers import free_port
from .attribution import attribute
from .servers import ROOT, Server, gunicorn, run_server, uvicorn

pytestmark = pytest.mark.e2e

MARKER_MS = 30.0
OWN_TARGET = 0.90  # hook mode: every request
ALWAYS_ON_MEDIAN_TARGET = 0.70  # always-on mode: the median over all requests of a run
ASGI_CASES = [
    "async",
    "def",
    "dep",
    "threadpool",
    "anyio",
    "executor",
    "to-thread",
    "stream-async",
    "stream-sync",
    "raise",
    "background",
]
WSGI_CASES = ["wsgi", "wsgi-stream", "wsgi-raise"]


@dataclass
class Sent:
    case: str
    n: int
    trace_id: str
    status: int
    marker_seconds: float  # how long the marker actually ran (the app's report)


def _send(base_url: str, case: str, n: int) -> Sent:
    trace_id = secrets.token_hex(16)
    headers = {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}
    limits = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=base_url, timeout=30, limits=limits) as client:
        response = client.get(f"/{case}/{n}", params={"ms": MARKER_MS}, headers=headers)
    return Sent(case, n, trace_id, response.status_code, _marker_seconds(response))


def _marker_seconds(response: httpx.Response) -> float:
    """How long the request's marker ran, as the app reports it: ``elapsed`` in a JSON
    body, or the sum of the ``chunk <i> <elapsed>`` lines of a streamed one."""
    if response.headers.get("content-type", "").startswith("text/plain"):
        return sum(float(line.split()[2]) for line in response.text.splitlines())
    elapsed = response.json().get("elapsed")
    assert isinstance(elapsed, float), f"no marker time in {response.status_code} {response.text}"
    return elapsed


def _stored(
    server: Server, trace_ids: list[str], timeout: float = 15.0
) -> dict[str, ProfileRecord]:
    store = SQLiteStore(str(server.state_dir / "profiles.db"))
    try:
        deadline = time.monotonic() + timeout
        while True:
            found = {t: r[0] for t in trace_ids if (r := store.get(t))}
            if len(found) == len(trace_ids) or time.monotonic() > deadline:
                return found
            time.sleep(0.1)
    finally:
        store.close()


def _report(
    title: str,
    rows: dict[str, list[float]],
    foreign: dict[str, int],
    totals: dict[str, list[float]],
) -> str:
    lines = [
        f"### {title}",
        "",
        "| case | requests | own min | own median | own max | profile/duration max "
        "| foreign markers |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for case, fractions in rows.items():
        lines.append(
            f"| {case} | {len(fractions)} | {min(fractions):.0%} | "
            f"{statistics.median(fractions):.0%} | {max(fractions):.0%} | "
            f"{max(totals[case]):.0%} | {foreign[case]} |"
        )
    text = "\n".join(lines) + "\n"
    _append(text)
    return text


def _append(text: str) -> None:
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    with open(artifacts / "honest-profiles.md", "a", encoding="utf-8") as out:
        out.write(text + "\n")
    print("\n" + text)


def _check(
    server: Server,
    sent: list[Sent],
    title: str,
    *,
    pooled_target: float = ALWAYS_ON_MEDIAN_TARGET,
    known_gap_floor: float | None = None,
) -> None:
    """Every profile stored, no foreign marker; hook mode: every request's own fraction;
    always-on: the pooled median. ``known_gap_floor``: an always-on pooled median between
    it and ``pooled_target`` is the known gap of issue 14 (an expected failure, with the
    figures); below the floor it fails."""
    title = f"{title}, mode {server.mode}"
    records = _stored(server, [s.trace_id for s in sent])
    missing = [s for s in sent if s.trace_id not in records]
    assert not missing, f"no profile stored for {missing}"
    rows: dict[str, list[float]] = {}
    foreign: dict[str, int] = {}
    totals: dict[str, list[float]] = {}  # each profile's recorded time over its duration
    failures = []
    for s in sent:
        session = records[s.trace_id].session()
        result = attribute(session, s.n)
        fraction = result.own_fraction(s.marker_seconds)
        rows.setdefault(s.case, []).append(fraction)
        recorded = sum(seconds for _, seconds in session.frame_records)
        totals.setdefault(s.case, []).append(recorded / session.duration)
        foreign[s.case] = foreign.get(s.case, 0) + len(result.foreign)
        # Always-on ticks are statistical (5 ms, jittered, GIL-bound): a single 30 ms
        # marker may get no tick under contention, so only the median is held there.
        too_low = server.mode == "hook" and fraction < OWN_TARGET
        if too_low or result.foreign:
            failures.append((s.case, s.n, round(fraction, 3), sorted(result.foreign)))
    _report(title, rows, foreign, totals)
    assert not failures, failures
    if server.mode == "always_on":
        pooled = statistics.median(f for fractions in rows.values() for f in fractions)
        _append(f"pooled median own fraction over {len(sent)} requests: {pooled:.0%}\n")
        if known_gap_floor is not None and known_gap_floor <= pooled < pooled_target:
            pytest.xfail(
                f"known gap (issue 14): pooled median {pooled:.0%} below {pooled_target:.0%}"
                f" (floor {known_gap_floor:.0%}): {rows}"
            )
        assert pooled >= pooled_target, rows


@pytest.fixture(scope="module", params=["hook", "always_on"])
def asgi_server(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Server]:
    port = free_port()
    tmp = tmp_path_factory.mktemp("honest-asgi")
    command = uvicorn("tests.e2e.honest_app:app", port, workers=1)
    with run_server(command, tmp, port=port, env={"OTELPROF_MODE": request.param}) as s:
        s.mode = request.param
        yield s


@pytest.fixture(scope="module", params=["hook", "always_on"])
def wsgi_server(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Server]:
    port = free_port()
    tmp = tmp_path_factory.mktemp("honest-wsgi")
    command = gunicorn("tests.e2e.honest_flask:app", port, workers=1, threads=8)
    with run_server(command, tmp, port=port, env={"OTELPROF_MODE": request.param}) as s:
        s.mode = request.param
        yield s


def test_each_case_one_at_a_time(asgi_server: Server) -> None:
    sent = [_send(asgi_server.base_url, case, n) for n in range(5) for case in ASGI_CASES]
    for s in sent:
        assert s.status == (500 if s.case == "raise" else 200), s
    _check(asgi_server, sent, "ASGI (uvicorn, 1 worker), one request at a time")


def test_32_concurrent_requests_never_mix(asgi_server: Server) -> None:
    jobs = [(ASGI_CASES[n % len(ASGI_CASES)], n) for n in range(32)]
    with ThreadPoolExecutor(32) as pool:
        sent = list(pool.map(lambda job: _send(asgi_server.base_url, *job), jobs))
    _check(asgi_server, sent, "ASGI (uvicorn, 1 worker), 32 concurrent requests")


def test_background_task_work_is_in_no_profile(asgi_server: Server) -> None:
    sent = [_send(asgi_server.base_url, "background", n) for n in range(4)]
    time.sleep(0.3)  # the background tasks run after the responses
    records = _stored(asgi_server, [s.trace_id for s in sent])
    for s in sent:
        result = attribute(records[s.trace_id].session(), s.n)
        if asgi_server.mode == "hook":
            assert result.own_fraction(s.marker_seconds) >= OWN_TARGET
        assert result.foreign == frozenset(), (s, result.foreign)  # n + 32 is not in it
    # ... nor in any other profile: background work is not attributed to any request.
    store = SQLiteStore(str(asgi_server.state_dir / "profiles.db"))
    try:
        for summary in store.list(limit=1000):
            for record in store.get(summary.trace_id):
                names = {
                    f.split("\x00")[0] for stack, _ in record.session().frame_records for f in stack
                }
                assert not any(f"marker_{n + 32}" in names for n in range(4)), summary
    finally:
        store.close()


def test_exception_keeps_profile_with_raising_frames_and_error_span(asgi_server: Server) -> None:
    s = _send(asgi_server.base_url, "raise", 5)
    assert s.status == 500
    [record] = _stored(asgi_server, [s.trace_id]).values()
    assert record.summary.status_code == 500
    names = {f.split("\x00")[0] for stack, _ in record.session().frame_records for f in stack}
    assert {"raises", "marker_5"} <= names
    deadline = time.monotonic() + 10
    while True:
        spans = [
            x
            for x in asgi_server.server_spans()
            if x["context"]["trace_id"].removeprefix("0x") == s.trace_id
        ]
        if spans or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    [span] = spans
    assert span["status"]["status_code"] == "ERROR"
    assert "otelprof.profile.url" in span["attributes"]


def test_short_request_gets_an_honest_profile(asgi_server: Server) -> None:
    trace_id = secrets.token_hex(16)
    response = httpx.get(
        asgi_server.base_url + "/short",
        headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"},
    )
    assert response.status_code == 200
    [record] = _stored(asgi_server, [trace_id]).values()
    assert record.summary.duration_ms > 0
    text = httpx.get(f"{asgi_server.base_url}/debug/profile/{trace_id}?format=text").text
    assert record.summary.route in text or "/short" in text
    if record.summary.sample_count == 0:
        assert "No samples were taken" in text


def test_client_disconnect_mid_stream_keeps_profile_and_leaks_nothing(asgi_server: Server) -> None:
    trace_id = secrets.token_hex(16)
    host, port = asgi_server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            f"GET /stream-sync/7?ms=600 HTTP/1.1\r\nHost: {host}\r\n"
            f"traceparent: 00-{trace_id}-{secrets.token_hex(8)}-01\r\n\r\n".encode()
        )
        assert b"200 OK" in sock.recv(4096)
    # the connection is closed mid-stream; the server notices on its next send
    [record] = _stored(asgi_server, [trace_id]).values()
    assert attribute(record.session(), 7).own_seconds > 0
    later = [_send(asgi_server.base_url, "async", 8) for _ in range(3)]
    for s in later:
        [other] = _stored(asgi_server, [s.trace_id]).values()
        assert 7 not in attribute(other.session(), 8).foreign


def test_wsgi_threads_each_hold_their_own_frames(wsgi_server: Server) -> None:
    jobs = [(WSGI_CASES[n % len(WSGI_CASES)], n) for n in range(24)]
    with ThreadPoolExecutor(16) as pool:
        sent = list(pool.map(lambda job: _send(wsgi_server.base_url, *job), jobs))
    for s in sent:
        assert s.status == (500 if s.case == "wsgi-raise" else 200), s
    # Always-on on 8 CPU-bound threads is issue 14's known gap: against each marker's own
    # time, the Flask rounds' pooled medians read 0.79-1.01 in 14 runs; below the floor it
    # still fails.
    _check(
        wsgi_server,
        sent,
        "WSGI (gunicorn gthread, 8 threads), 24 requests 16 at a time",
        known_gap_floor=ALWAYS_ON_KNOWN_GAP_FLOORS["wsgi"],
    )


@pytest.fixture(scope="module", autouse=True)
def _fresh_report() -> None:
    path = ROOT / "test-artifacts" / "honest-profiles.md"
    if path.exists() and os.environ.get("OTELPROF_KEEP_REPORT") != "1":
        path.unlink()


CASE_MEDIAN_TARGET = 0.85  # issue 14's bar: every case's median own fraction
CASE_MEDIAN_CEILING = 1.25  # above: a case's profiles over-count their marker
# Always-on: a case's median below the target is issue 14's known gap, an expected failure
# (xfail, with the figures); below its floor it fails. The gap is work on threads whose
# ticks wait for the GIL behind them: a 10 ms sync stream chunk on a worker thread often
# ends before any tick (the SIGPROF timer's 5 ms of CPU, then up to a 5 ms switch interval
# before the loop thread runs the handler), and its time goes under the generator without
# the frames inside it; gunicorn's 8 threads spinning at once wait each other out too.
# Measured against each marker's own time, 14 runs of the ASGI cases on one machine: per
# case medians 0.87-1.04 but for sync streaming (0.71-1.00); 6 runs of the Flask cases:
# 0.84-1.00 (view, raising view) and 0.72-0.98 (generator body).
ALWAYS_ON_CASE_MEDIAN_FLOOR = 0.75
ALWAYS_ON_KNOWN_GAP_FLOORS = {
    "stream-sync": 0.50,
    "wsgi": 0.40,
    "wsgi-stream": 0.40,
    "wsgi-raise": 0.40,
}


def _eight_at_a_time(server: Server, cases: list[str], title: str) -> None:
    """8 concurrent requests of one way of running work, case after case: each case's
    median own fraction >= the target (hook mode) or its floor (always-on, where one
    between the floor and the target is the known gap: xfail), never above the ceiling,
    and no foreign marker anywhere.

    A case whose median of 8 falls below its floor is sent 8 more times and judged on
    all 16: a burst of another process's CPU on a shared machine can pull 8 requests
    down at once (an always-on async streaming case read 0.74 so, where 14 undisturbed
    runs read 0.87 to 1.04), and a real loss stays low over 16.
    """
    always_on = server.mode == "always_on"
    floors = {
        case: ALWAYS_ON_KNOWN_GAP_FLOORS.get(case, ALWAYS_ON_CASE_MEDIAN_FLOOR)
        if always_on
        else CASE_MEDIAN_TARGET
        for case in cases
    }
    sent = _eight_each(server, cases, set(cases))
    medians = _case_medians(server, sent)
    again = {case for case in cases if medians.get(case, 0.0) < floors[case]}
    if again:
        sent += _eight_each(server, cases, again)
        medians = _case_medians(server, sent)
    _check(server, sent, title, pooled_target=0.0)  # (each case's median is held below)
    low = {case: round(m, 2) for case, m in medians.items() if m < floors[case]}
    high = {case: round(m, 2) for case, m in medians.items() if m > CASE_MEDIAN_CEILING}
    assert not low, f"cases below their floor ({floors}), after 16 requests each: {low}"
    assert not high, f"cases above {CASE_MEDIAN_CEILING:.0%} median: {high}"
    gap = {case: round(m, 2) for case, m in medians.items() if m < CASE_MEDIAN_TARGET}
    if gap:
        pytest.xfail(f"known gap (issue 14): cases below {CASE_MEDIAN_TARGET:.0%} median: {gap}")


def _eight_each(server: Server, cases: list[str], chosen: set[str]) -> list[Sent]:
    """8 concurrent requests of each chosen case, case after case (each case has its own
    8 of the 64 markers, by its place in ``cases``)."""
    sent: list[Sent] = []
    with ThreadPoolExecutor(8) as pool:
        for index, case in enumerate(cases):
            if case not in chosen:
                continue
            numbers = range(8 * (index % 8), 8 * (index % 8) + 8)  # (64 markers)
            sent.extend(pool.map(lambda n, case=case: _send(server.base_url, case, n), numbers))
    return sent


def _case_medians(server: Server, sent: list[Sent]) -> dict[str, float]:
    """Each case's median own fraction over its stored profiles (``_check`` fails on a
    missing one)."""
    records = _stored(server, [s.trace_id for s in sent])
    fractions: dict[str, list[float]] = {}
    for s in sent:
        if s.trace_id in records:
            result = attribute(records[s.trace_id].session(), s.n)
            fractions.setdefault(s.case, []).append(result.own_fraction(s.marker_seconds))
    return {case: statistics.median(values) for case, values in fractions.items()}


def test_8_concurrent_per_case(asgi_server: Server) -> None:
    cases = [case for case in ASGI_CASES if case != "background"]  # (in no profile)
    _eight_at_a_time(asgi_server, cases, "ASGI (uvicorn, 1 worker), 8 concurrent per case")


def test_wsgi_8_concurrent_per_case(wsgi_server: Server) -> None:
    _eight_at_a_time(wsgi_server, WSGI_CASES, "WSGI (gunicorn gthread, 8 threads), 8 per case")
