"""MemoryStore: the ProfileStore contract, bounds and thread safety."""

from __future__ import annotations

import threading
import time

import pytest
from pyinstrument import Profiler
from pyinstrument.renderers import ConsoleRenderer
from pyinstrument.session import Session

from otelprof_middleware._record import ProfileRecord, ProfileSummary
from otelprof_middleware.stores import MemoryStore, ProfileStore


def _leaf() -> int:
    return sum(range(200))


def memory_store_profiled_work() -> None:
    end = time.perf_counter() + 0.02
    while time.perf_counter() < end:
        _leaf()


@pytest.fixture(scope="module")
def session() -> Session:
    profiler = Profiler(interval=0.0001, async_mode="disabled")
    profiler.start()
    memory_store_profiled_work()
    return profiler.stop()


def _summary(n: int, **overrides: object) -> ProfileSummary:
    fields: dict[str, object] = {
        "trace_id": f"{n + 1:032x}",
        "span_id": f"{n + 1:016x}",
        "method": "GET",
        "route": "/items/{item_id}",
        "status_code": 200,
        "duration_ms": 10.0,
        "start_time": 1_700_000_000.0 + n,
    }
    fields.update(overrides)
    return ProfileSummary(**fields)  # type: ignore[arg-type]


def _record(n: int, payload: bytes = b"p" * 100, **overrides: object) -> ProfileRecord:
    return ProfileRecord(summary=_summary(n, **overrides), payload=payload)


def test_is_a_profile_store() -> None:
    store = MemoryStore()
    assert isinstance(store, ProfileStore)
    assert store.url == "memory://"


def test_round_trip_renders_the_profiled_function(session: Session) -> None:
    store = MemoryStore()
    record = ProfileRecord.from_session(_summary(1, sample_count=7, mode="timer"), session)
    store.put(record)

    [got] = store.get(record.summary.trace_id)

    assert got.summary == record.summary
    text = ConsoleRenderer(unicode=False, color=False).render(got.session())
    assert "memory_store_profiled_work" in text


def test_get_by_span_and_unknown_ids() -> None:
    store = MemoryStore()
    a = _record(1)
    b = _record(2, trace_id=a.summary.trace_id)
    store.put(a)
    store.put(b)

    assert store.get(a.summary.trace_id) == [b, a]  # newest first
    assert store.get(a.summary.trace_id, a.summary.span_id) == [a]
    assert store.get(a.summary.trace_id, "f" * 16) == []
    assert store.get("e" * 32) == []


def test_put_replaces_the_same_ids() -> None:
    store = MemoryStore()
    store.put(_record(1, payload=b"x" * 10))
    replacement = _record(1, payload=b"y" * 30, status_code=500)
    store.put(replacement)

    assert store.get(replacement.summary.trace_id) == [replacement]
    assert store.stats() == (1, 30)


def test_kept_reason_round_trips() -> None:
    store = MemoryStore()
    reasons = ["slow", "error", "triggered", "min_duration", ""]
    records = [_record(n, kept_reason=reason) for n, reason in enumerate(reasons, 1)]
    for record in records:
        store.put(record)

    for record in records:
        assert store.get(record.summary.trace_id) == [record]
    assert [s.kept_reason for s in store.list()] == reasons[::-1]
    assert store.list() == [r.summary for r in records[::-1]]
    assert [s.kept_reason for s in store.list(order="slowest", limit=2)] == ["", "min_duration"]


def test_list_orders_and_filters() -> None:
    store = MemoryStore()
    store.put(_record(1, duration_ms=50.0, route="/a"))
    store.put(_record(2, duration_ms=5.0, route="/b"))
    store.put(_record(3, duration_ms=500.0, route="/a"))
    store.put(_record(4, duration_ms=20.0, route="/a"))

    def spans(summaries: object) -> list[int]:
        assert isinstance(summaries, list)
        return [int(s.span_id, 16) - 1 for s in summaries]

    assert spans(store.list()) == [4, 3, 2, 1]
    assert spans(store.list(order="slowest")) == [3, 1, 4, 2]
    assert spans(store.list(route="/a")) == [4, 3, 1]
    assert spans(store.list(route="/nope")) == []
    assert spans(store.list(min_duration_ms=20.0)) == [4, 3, 1]
    assert spans(store.list(since=1_700_000_002.0, until=1_700_000_003.0)) == [3, 2]
    assert spans(store.list(limit=2)) == [4, 3]
    assert spans(store.list(limit=2, order="slowest", route="/a")) == [3, 1]
    assert spans(store.list(limit=0)) == []


def test_list_rejects_bad_arguments() -> None:
    store = MemoryStore()
    with pytest.raises(ValueError, match="order"):
        store.list(order="oldest")
    with pytest.raises(ValueError, match="limit"):
        store.list(limit=-1)


def test_delete() -> None:
    store = MemoryStore()
    a = _record(1)
    b = _record(2, trace_id=a.summary.trace_id)
    c = _record(3)
    for record in (a, b, c):
        store.put(record)

    assert store.delete(a.summary.trace_id, b.summary.span_id) == 1
    assert store.get(a.summary.trace_id) == [a]
    assert store.delete(a.summary.trace_id) == 1
    assert store.delete(a.summary.trace_id) == 0
    assert store.stats() == (1, c.size)


def test_evicts_oldest_by_count() -> None:
    store = MemoryStore(max_profiles=3)
    for n in (5, 1, 4, 2, 3):  # inserted out of start_time order
        store.put(_record(n))

    assert [s.span_id for s in store.list()] == [f"{n + 1:016x}" for n in (5, 4, 3)]
    assert store.stats() == (3, 300)

    store.put(_record(0))  # older than everything kept: evicted at once
    assert [s.span_id for s in store.list()] == [f"{n + 1:016x}" for n in (5, 4, 3)]


def test_eviction_breaks_start_time_ties_by_insertion_order() -> None:
    store = MemoryStore(max_profiles=2)
    for n in (1, 2, 3):
        store.put(_record(n, start_time=1.0))

    assert {s.span_id for s in store.list()} == {f"{n + 1:016x}" for n in (2, 3)}


def test_evicts_oldest_by_bytes() -> None:
    store = MemoryStore(max_bytes=2500)
    for n in range(5):
        store.put(_record(n, payload=b"z" * 1000))

    assert store.stats() == (2, 2000)
    assert [s.span_id for s in store.list()] == [f"{n + 1:016x}" for n in (4, 3)]


def test_refuses_a_record_larger_than_max_bytes() -> None:
    store = MemoryStore(max_bytes=100)
    store.put(_record(1, payload=b"a" * 100))
    with pytest.raises(ValueError, match="max_bytes"):
        store.put(_record(2, payload=b"a" * 101))
    assert store.stats() == (1, 100)


@pytest.mark.parametrize("bounds", [{"max_profiles": 0}, {"max_bytes": 0}, {"max_bytes": 1.5}])
def test_rejects_bad_bounds(bounds: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        MemoryStore(**bounds)  # type: ignore[arg-type]


def test_many_threads_stay_within_bounds() -> None:
    store = MemoryStore(max_profiles=100)
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for i in range(200):
                n = t * 1000 + i
                store.put(_record(n, payload=b"q" * (1 + n % 7)))
                store.list(limit=5)
                if i % 10 == 0:
                    store.delete(f"{n + 1:032x}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    count, total = store.stats()
    summaries = store.list(limit=1000)
    assert count == len(summaries) <= 100
    assert total == sum(r.size for s in summaries for r in store.get(s.trace_id, s.span_id))


def test_close_is_idempotent_and_keeps_records() -> None:
    store = MemoryStore()
    store.put(_record(1))
    store.close()
    store.close()
    assert store.stats() == (1, 100)


def test_one_trace_across_services_memory() -> None:
    store = MemoryStore()
    # Two services sharing the store served spans of one trace: get(trace_id) returns
    # every span of it, each with its service, newest first; other traces stay apart.
    trace_id = f"{77:032x}"
    a = _record(1, trace_id=trace_id, service="frontend", kept_reason="slow")
    b = _record(2, trace_id=trace_id, service="pricing\u00e9", route="/price")
    other = _record(3, service="frontend")
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
