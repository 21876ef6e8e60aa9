"""MemoryStore: its URL, bounds and thread safety (the ProfileStore contract it shares
with the other stores: ``test_protocol.py``)."""

from __future__ import annotations

from otelprof_middleware.stores import MemoryStore, ProfileStore
from tests.helpers import in_threads, make_record, summary_numbers


def test_is_a_profile_store() -> None:
    store = MemoryStore()
    assert isinstance(store, ProfileStore)
    assert store.url == "memory://"


def test_eviction_breaks_start_time_ties_by_insertion_order() -> None:
    store = MemoryStore(max_profiles=2)
    for n in (1, 2, 3):
        store.put(make_record(n, start_time=1.0))

    assert set(summary_numbers(store.list())) == {2, 3}


def test_many_threads_stay_within_bounds() -> None:
    store = MemoryStore(max_profiles=100)

    def worker(t: int) -> None:
        for i in range(200):
            n = t * 1000 + i
            store.put(make_record(n, payload=b"q" * (1 + n % 7)))
            store.list(limit=5)
            if i % 10 == 0:
                store.delete(f"{n + 1:032x}")

    assert in_threads(worker, 8) == []
    count, total = store.stats()
    summaries = store.list(limit=1000)
    assert count == len(summaries) <= 100
    assert total == sum(r.size for s in summaries for r in store.get(s.trace_id, s.span_id))


def test_close_is_idempotent_and_keeps_records() -> None:
    # The stores with a file or a server refuse to be used after close: test_protocol.py.
    store = MemoryStore()
    store.put(make_record(1))
    store.close()
    store.close()
    assert store.stats() == (1, 100)
