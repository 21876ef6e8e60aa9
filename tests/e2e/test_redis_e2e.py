"""End to end with Redis: two app processes and ``otelprof serve`` share one real
redis-server; a profile link minted by one app opens on the other and on the viewer.
Then the Redis store's put and list latency under concurrent load, printed."""

from __future__ import annotations

import statistics
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from otelprof_middleware._record import ProfileRecord
from otelprof_middleware.stores import RedisStore
from tests.redis_server import RedisServer, started

from ..helpers import free_port, make_record, make_summary, profile
from .servers import BIN, Server, fetch_profile, run_server, uvicorn

pytestmark = pytest.mark.e2e

PROFILE_URL = "otelprof.profile.url"


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with started(tmp_path_factory.mktemp("redis")) as server:
        yield server


def _links(server: Server, count: int) -> list[str]:
    """The profile URLs on ``server``'s exported server spans (spans end after the
    response, so wait for them)."""
    deadline = time.monotonic() + 10
    while True:
        urls = [
            s["attributes"][PROFILE_URL]
            for s in server.server_spans()
            if PROFILE_URL in s["attributes"]
        ]
        if len(urls) >= count or time.monotonic() > deadline:
            return urls
        time.sleep(0.1)


def _serve_command(store_url: str, port: int) -> list[str]:
    python = str(BIN / "python")
    return [
        python,
        "-m",
        "otelprof_middleware.cli",
        "serve",
        "--store",
        store_url,
        *("--port", str(port)),
    ]


def test_a_link_minted_by_one_app_opens_on_the_other_and_on_otelprof_serve(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    env = {"OTELPROF_STORE": redis_server.url, "OTELPROF_PUBLIC_URL": ""}
    port_a, port_b, port_viewer = free_port(), free_port(), free_port()
    for name in ("a", "b", "viewer"):
        (tmp_path / name).mkdir()
    with ExitStack() as stack:
        app_a, app_b = (
            stack.enter_context(
                run_server(
                    uvicorn("demo_app.fastapi_app:app", port, workers=1),
                    tmp_path / name,
                    env=env,
                    port=port,
                )
            )
            for name, port in (("a", port_a), ("b", port_b))
        )
        viewer = stack.enter_context(
            run_server(
                _serve_command(redis_server.url, port_viewer),
                tmp_path / "viewer",
                port=port_viewer,
            )
        )
        assert httpx.get(app_a.base_url + "/cpu", params={"ms": 40}).status_code == 200
        assert httpx.get(app_b.base_url + "/items/7").status_code == 200

        [link_a] = _links(app_a, 1)
        [link_b] = _links(app_b, 1)
        assert link_a.startswith(app_a.base_url + "/debug/profile/")
        assert link_b.startswith(app_b.base_url + "/debug/profile/")

        # A's link, opened on B and on the standalone viewer; B's, opened on A.
        for base in (app_b.base_url, viewer.base_url, app_a.base_url):
            response = fetch_profile(link_a.replace(app_a.base_url, base))
            assert response.status_code == 200, (base, response.text)
            assert "crunch_numbers" in response.text
            html = fetch_profile(link_a.replace(app_a.base_url, base), "html")
            assert html.status_code == 200 and "<html" in html.text.lower()
        response = fetch_profile(link_b.replace(app_b.base_url, app_a.base_url))
        assert response.status_code == 200 and "item" in response.text

        # Every index lists both apps' profiles, with links on its own host.
        for server in (app_a, app_b, viewer):
            index = httpx.get(server.base_url + "/debug/profile?format=json").json()
            routes = {row["route"] for row in index["profiles"]}
            assert {"/cpu", "/items/{item_id}"} <= routes
            assert all(row["url"].startswith(server.base_url) for row in index["profiles"])


# -- latency under load ---------------------------------------------------------------------

WRITERS = 4
PUTS_PER_WRITER = 500
ROUTES = ("/cpu", "/io", "/items/{item_id}", "/stream", "/orders/{order_id}")


def _percentiles(samples_ns: list[int]) -> tuple[float, float]:
    ordered = sorted(samples_ns)
    p50 = statistics.median(ordered) / 1000
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))] / 1000
    return p50, p99


def _real_payload() -> bytes:
    """A compressed pyinstrument session of a demo-like request."""
    from demo_app.work import crunch_numbers

    session = profile(lambda: crunch_numbers(30), interval=0.001)
    summary = make_summary(route="/cpu", duration_ms=30.0, start_time=time.time())
    return ProfileRecord.from_session(summary, session).payload


def _record(n: int, payload: bytes) -> ProfileRecord:
    """Ids ``n`` (make_summary counts from 0), a route and duration spread by ``n``."""
    return make_record(
        n - 1,
        payload,
        route=ROUTES[n % len(ROUTES)],
        duration_ms=float(5 + (n * 7919) % 400),
        start_time=time.time(),
        sample_count=30,
    )


def _timed(call: Any, *args: Any, **kwargs: Any) -> int:
    start = time.perf_counter_ns()
    call(*args, **kwargs)
    return time.perf_counter_ns() - start


def test_store_put_and_list_latency_under_load(
    redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    payload = _real_payload()
    figures: dict[str, Any] = {"payload_bytes": len(payload)}

    # One thread: puts into a store already at its bound, then lists.
    single = RedisStore(redis_server.url, prefix="single:", max_profiles=1000)
    try:
        single.put_many([_record(n, payload) for n in range(1, 1001)])
        puts = [_timed(single.put, _record(n, payload)) for n in range(1001, 1501)]
        lists = [_timed(single.list, limit=100) for _ in range(100)]
        batches = [
            _timed(single.put_many, [_record(2000 + 64 * b + i, payload) for i in range(64)])
            for b in range(20)
        ]
        assert single.stats() == (1000, 1000 * len(payload))
    finally:
        single.close()
    figures["one_thread"] = {
        "put_p50_p99_us": [round(v) for v in _percentiles(puts)],
        "list100_p50_p99_us": [round(v) for v in _percentiles(lists)],
        "put_many64_p50_p99_us": [round(v) for v in _percentiles(batches)],
    }

    store = RedisStore(redis_server.url, prefix="latency:", max_profiles=1000)
    put_ns: list[list[int]] = [[] for _ in range(WRITERS)]
    list_ns: list[int] = []
    errors: list[BaseException] = []
    writing = threading.Event()
    writing.set()

    def writer(worker: int) -> None:
        try:
            for i in range(PUTS_PER_WRITER):
                record = _record(worker * 100_000 + i + 1, payload)
                put_ns[worker].append(_timed(store.put, record))
        except BaseException as exc:
            errors.append(exc)

    def reader() -> None:
        try:
            order = "newest"
            while writing.is_set():
                start = time.perf_counter_ns()
                rows = store.list(limit=100, order=order)
                list_ns.append(time.perf_counter_ns() - start)
                assert len(rows) <= 100
                order = "slowest" if order == "newest" else "newest"
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
    read_thread = threading.Thread(target=reader)
    started = time.perf_counter()
    try:
        read_thread.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        elapsed = time.perf_counter() - started
        writing.clear()
        read_thread.join(30)

        assert not errors, errors
        puts = [ns for per_writer in put_ns for ns in per_writer]
        assert len(puts) == WRITERS * PUTS_PER_WRITER
        assert list_ns, "the reader never ran"
        assert store.stats() == (1000, 1000 * len(payload))
        assert len(store.list(limit=100)) == 100
    finally:
        writing.clear()
        store.close()
    figures["load"] = {
        "puts_per_s": round(len(puts) / elapsed),
        "put_p50_p99_us": [round(v) for v in _percentiles(puts)],
        "lists": len(list_ns),
        "list100_p50_p99_us": [round(v) for v in _percentiles(list_ns)],
    }
    with capsys.disabled():
        print(
            f"\nRedis store latency ({len(payload)}-byte profiles, max_profiles=1000; "
            f"one_thread: a single thread; load: {WRITERS} writer threads x "
            f"{PUTS_PER_WRITER} puts while one thread lists 100, newest and slowest in "
            f"turn): {figures}",
            file=sys.stderr,
        )
