"""The one ProfileStore protocol, put_many included, on every store; the shared checks
live next to it and the old import paths still work.

The contract tests here run on memory, SQLite and Redis alike; what only one backend
does (its URL, its file or keys, TTL, concurrency, connection loss) stays in
``test_memory.py``, ``test_sqlite.py`` and ``test_redis.py``. After each write a
contract test recounts the store independently of its own ``stats()``: the SQLite file's
totals against its rows (and its integrity), the Redis prefix's indexes against its keys.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from pyinstrument.renderers import ConsoleRenderer
from pyinstrument.session import Session

from otelprof_middleware._record import ProfileRecord
from otelprof_middleware.stores import MemoryStore, ProfileStore, RedisStore, SQLiteStore, _base
from otelprof_middleware.stores import memory as memory_module
from otelprof_middleware.stores import redis as redis_module
from tests.helpers import make_record, make_summary, profile, summary_numbers
from tests.redis_server import RedisServer  # the redis_server fixture: conftest.py
from tests.stores.checks import integrity_and_totals, redis_index


@pytest.fixture(params=["memory", "sqlite", "redis"])
def make_store(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: RedisServer
) -> Iterator[Callable[..., ProfileStore]]:
    made: list[ProfileStore] = []

    def make(**bounds: object) -> ProfileStore:
        store: ProfileStore
        if request.param == "memory":
            store = MemoryStore(**bounds)  # type: ignore[arg-type]
        elif request.param == "sqlite":
            store = SQLiteStore(tmp_path / f"{len(made)}.db", **bounds)  # type: ignore[arg-type]
        else:
            # A prefix no other store of the session had: the server's data outlives each
            # test, and an ``id()`` is reused once its object is freed (a prefix made from one
            # gave a test another test's records, and evicting them emptied its store).
            url = redis_server.url + f"/0?prefix=p{uuid.uuid4().hex[:12]}:"
            store = RedisStore(url, **bounds)  # type: ignore[arg-type]
        assert store.stats() == (0, 0), "a new store must start empty (its own file or prefix)"
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


@pytest.fixture
def store(make_store: Callable[..., ProfileStore]) -> ProfileStore:
    return make_store()


@pytest.fixture
def recount(redis_server: RedisServer) -> Iterator[Callable[[ProfileStore], tuple[int, int]]]:
    """``(count, bytes)`` of a store read independently of its ``stats()``: a SQLite
    file's totals must match its rows (and pass its integrity check), a Redis prefix's
    indexes its keys; a MemoryStore has nothing else to read."""
    raw = redis.Redis.from_url(redis_server.url + "/0")

    def recount(store: ProfileStore) -> tuple[int, int]:
        if isinstance(store, SQLiteStore):
            integrity, totals, real = integrity_and_totals(Path(store.path))
            assert (integrity, totals) == ("ok", real)
            return real
        if isinstance(store, RedisStore):
            return redis_index(raw, store.prefix)
        return store.stats()

    yield recount
    raw.close()


def store_profiled_work() -> None:
    end = time.perf_counter() + 0.02
    while time.perf_counter() < end:
        sum(range(200))


@pytest.fixture(scope="module")
def session() -> Session:
    return profile(store_profiled_work)


def _small(n: int, size: int = 10, start: float | None = None) -> ProfileRecord:
    """Record ``n`` of ``size`` bytes on route /r, ``n`` ms long, started at 1000 + n."""
    return make_record(
        n, b"x" * size, route="/r", duration_ms=float(n), start_time=start or 1000.0 + n
    )


# -- put_many and the shared checks --------------------------------------------------


def test_every_store_is_a_profile_store_with_put_many(
    make_store: Callable[..., ProfileStore],
) -> None:
    store = make_store()
    assert isinstance(store, ProfileStore)
    store.put_many([_small(1), _small(2)])
    assert [s.trace_id for s in store.list()] == [f"{3:032x}", f"{2:032x}"]
    store.put_many([])
    assert store.stats() == (2, 20)


def test_put_many_refuses_the_whole_batch_when_one_record_is_too_large(
    make_store: Callable[..., ProfileStore],
) -> None:
    store = make_store(max_bytes=100)
    store.put(_small(1))
    with pytest.raises(ValueError, match="exceeds the store's max_bytes"):
        store.put_many([_small(2), _small(3, size=101)])
    assert store.stats() == (1, 10), "nothing of the batch was written"


def test_put_many_replaces_and_evicts_once_after_the_batch(
    make_store: Callable[..., ProfileStore],
) -> None:
    store = make_store(max_profiles=2)
    store.put(_small(1))
    # The batch holds a newer copy of record 1 and two new records: eviction after the
    # batch drops the oldest by start time, whichever write it came from.
    store.put_many([_small(2), _small(1, size=30, start=2000.0), _small(3)])
    assert store.stats() == (2, 40)
    assert [(s.trace_id, s.start_time) for s in store.list()] == [
        (f"{2:032x}", 2000.0),
        (f"{4:032x}", 1003.0),
    ]


def test_shared_checks_live_next_to_the_protocol() -> None:
    for name in ("DEFAULT_MAX_BYTES", "DEFAULT_MAX_PROFILES", "ORDERS"):
        assert getattr(memory_module, name) is getattr(_base, name)
    assert redis_module.redact_url is _base.redact_url
    with pytest.raises(ValueError, match="max_bytes must be a positive int"):
        _base.check_bounds(1, 0)
    with pytest.raises(ValueError, match="order must be one of"):
        _base.check_list_args(1, "oldest")
    summary = _small(5).summary
    assert _base.matches(summary, "/r", 5.0, 1005.0, 1005.0)
    assert not _base.matches(summary, "/other", None, None, None)
    assert not _base.matches(summary, None, 5.5, None, None)
    assert not _base.matches(summary, None, None, 1005.5, None)
    assert not _base.matches(summary, None, None, None, 1004.5)


# -- the contract ----------------------------------------------------------------------


def test_round_trip_renders_the_profiled_function(store: ProfileStore, session: Session) -> None:
    summary = make_summary(1, sample_count=7, mode="timer", interval_ms=0.5, status_code=503)
    record = ProfileRecord.from_session(summary, session)
    store.put(record)

    [got] = store.get(summary.trace_id, summary.span_id)

    assert got == record
    text = ConsoleRenderer(unicode=False, color=False).render(got.session())
    assert "store_profiled_work" in text


def test_get_by_span_and_unknown_ids(store: ProfileStore) -> None:
    a = make_record(1)
    b = make_record(2, trace_id=a.summary.trace_id)
    store.put(a)
    store.put(b)

    assert store.get(a.summary.trace_id) == [b, a]  # newest first
    assert store.get(a.summary.trace_id, a.summary.span_id) == [a]
    assert store.get(a.summary.trace_id, "f" * 16) == []
    assert store.get("e" * 32) == []


def test_put_replaces_the_same_ids(
    store: ProfileStore, recount: Callable[[ProfileStore], tuple[int, int]]
) -> None:
    store.put(make_record(1, payload=b"x" * 10, route="/old"))
    replacement = make_record(1, payload=b"y" * 30, status_code=500, route="/new")
    store.put(replacement)

    assert store.get(replacement.summary.trace_id) == [replacement]
    assert store.stats() == (1, 30)
    assert store.list(route="/old") == []
    assert summary_numbers(store.list(route="/new")) == [1]
    assert recount(store) == (1, 30)


def test_list_orders_and_filters(store: ProfileStore) -> None:
    store.put(make_record(1, duration_ms=50.0, route="/a"))
    store.put(make_record(2, duration_ms=5.0, route="/b"))
    store.put(make_record(3, duration_ms=500.0, route="/a"))
    store.put(make_record(4, duration_ms=20.0, route="/a"))

    def numbers(**query: object) -> list[int]:
        return summary_numbers(store.list(**query))  # type: ignore[arg-type]

    assert numbers() == [4, 3, 2, 1]
    assert numbers(order="slowest") == [3, 1, 4, 2]
    assert numbers(route="/a") == [4, 3, 1]
    assert numbers(route="/nope") == []
    assert numbers(min_duration_ms=20.0) == [4, 3, 1]
    assert numbers(min_duration_ms=20.0, order="slowest") == [3, 1, 4]
    assert numbers(since=1_700_000_002.0, until=1_700_000_003.0) == [3, 2]
    assert numbers(since=1_700_000_002.0, order="slowest") == [3, 4, 2]
    assert numbers(route="/a", since=1_700_000_002.0, min_duration_ms=30) == [3]
    assert numbers(limit=2) == [4, 3]
    assert numbers(limit=2, order="slowest", route="/a") == [3, 1]
    assert numbers(limit=0) == []
    assert store.list(limit=1)[0] == make_summary(4, duration_ms=20.0, route="/a")


def test_list_rejects_bad_arguments(store: ProfileStore) -> None:
    with pytest.raises(ValueError, match="order"):
        store.list(order="oldest")
    with pytest.raises(ValueError, match="limit"):
        store.list(limit=-1)


def test_kept_reason_round_trips(store: ProfileStore) -> None:
    reasons = ["slow", "error", "triggered", "min_duration", ""]
    records = [make_record(n, kept_reason=reason) for n, reason in enumerate(reasons, 1)]
    store.put(records[0])  # written both ways: one at a time and in a batch
    store.put(records[1])
    store.put_many(records[2:])

    for record in records:
        assert store.get(record.summary.trace_id) == [record]
    listed = store.list()
    assert [s.kept_reason for s in listed] == reasons[::-1]
    assert listed == [r.summary for r in records[::-1]]
    # Equal durations: newest first.
    assert [s.kept_reason for s in store.list(order="slowest", limit=2)] == ["", "min_duration"]
    assert [s.kept_reason for s in store.list(order="slowest", route="/items/{item_id}")] == (
        reasons[::-1]
    )


def test_delete(store: ProfileStore, recount: Callable[[ProfileStore], tuple[int, int]]) -> None:
    a = make_record(1)
    b = make_record(2, trace_id=a.summary.trace_id)
    c = make_record(3)
    for record in (a, b, c):
        store.put(record)

    assert store.delete(a.summary.trace_id, b.summary.span_id) == 1
    assert store.get(a.summary.trace_id) == [a]
    assert store.delete(a.summary.trace_id) == 1
    assert store.delete(a.summary.trace_id) == 0
    assert store.stats() == (1, c.size)
    assert recount(store) == (1, 100)


def test_evicts_oldest_by_count(
    make_store: Callable[..., ProfileStore], recount: Callable[[ProfileStore], tuple[int, int]]
) -> None:
    store = make_store(max_profiles=3)
    for n in (5, 1, 4, 2, 3):  # inserted out of start_time order
        store.put(make_record(n))
    assert summary_numbers(store.list()) == [5, 4, 3]
    assert store.stats() == (3, 300)

    store.put(make_record(0))  # older than everything kept: evicted at once
    assert summary_numbers(store.list()) == [5, 4, 3]
    assert recount(store) == (3, 300)


def test_evicts_oldest_by_bytes(
    make_store: Callable[..., ProfileStore], recount: Callable[[ProfileStore], tuple[int, int]]
) -> None:
    store = make_store(max_bytes=2500)
    for n in range(5):
        store.put(make_record(n, payload=b"z" * 1000))
    assert store.stats() == (2, 2000)
    assert summary_numbers(store.list()) == [4, 3]
    assert recount(store) == (2, 2000)


def test_refuses_a_record_larger_than_max_bytes(make_store: Callable[..., ProfileStore]) -> None:
    store = make_store(max_bytes=100)
    store.put(make_record(1, payload=b"a" * 100))
    with pytest.raises(ValueError, match="max_bytes"):
        store.put(make_record(2, payload=b"a" * 101))
    assert store.stats() == (1, 100)


@pytest.mark.parametrize(
    "bounds", [{"max_profiles": 0}, {"max_bytes": 0}, {"max_bytes": -1}, {"max_bytes": 1.5}]
)
def test_rejects_bad_bounds(
    make_store: Callable[..., ProfileStore], bounds: dict[str, object]
) -> None:
    with pytest.raises(ValueError):
        make_store(**bounds)


@pytest.mark.parametrize("make_store", ["sqlite", "redis"], indirect=True)
def test_use_after_close_raises_and_close_is_idempotent(store: ProfileStore) -> None:
    # A MemoryStore keeps its records after close instead: test_memory.py.
    store.close()
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.put(make_record(1))


def test_one_trace_across_services(store: ProfileStore) -> None:
    # Two services sharing the store served spans of one trace: get(trace_id) returns
    # every span of it, each with its service, newest first; other traces stay apart.
    trace_id = f"{77:032x}"
    a = make_record(1, trace_id=trace_id, service="frontend", kept_reason="slow")
    b = make_record(2, trace_id=trace_id, service="pricing\u00e9", route="/price")
    other = make_record(3, service="frontend")
    for record in (a, other, b):
        store.put(record)

    assert store.get(trace_id) == [b, a]
    assert [r.summary.service for r in store.get(trace_id)] == ["pricing\u00e9", "frontend"]
    assert store.get(trace_id, a.summary.span_id) == [a]
    assert store.get(other.summary.trace_id) == [other]
    assert [s.service for s in store.list()] == ["frontend", "pricing\u00e9", "frontend"]
    assert store.list(route="/price") == [b.summary]
    assert store.delete(trace_id) == 2
    assert store.get(trace_id) == []
