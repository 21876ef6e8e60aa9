"""The one ProfileStore protocol, put_many included, on every store; the shared checks
live next to it and the old import paths still work."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from otelprof_middleware._record import ProfileRecord, ProfileSummary
from otelprof_middleware.stores import MemoryStore, ProfileStore, RedisStore, SQLiteStore, _base
from otelprof_middleware.stores import memory as memory_module
from otelprof_middleware.stores import redis as redis_module
from tests.redis_server import RedisServer  # the redis_server fixture: conftest.py


@pytest.fixture(params=["memory", "sqlite", "redis"])
def make_store(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: RedisServer
) -> Iterator[Callable[..., ProfileStore]]:
    made: list[ProfileStore] = []

    def make(**bounds: int) -> ProfileStore:
        store: ProfileStore
        if request.param == "memory":
            store = MemoryStore(**bounds)
        elif request.param == "sqlite":
            store = SQLiteStore(tmp_path / f"{len(made)}.db", **bounds)
        else:
            store = RedisStore(redis_server.url + f"/0?prefix=p{id(made)}-{len(made)}:", **bounds)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def _record(n: int, size: int = 10, start: float | None = None) -> ProfileRecord:
    summary = ProfileSummary(
        f"{n + 1:032x}", f"{n + 1:016x}", "GET", "/r", 200, float(n), start or 1000.0 + n
    )
    return ProfileRecord(summary, b"x" * size)


def test_every_store_is_a_profile_store_with_put_many(
    make_store: Callable[..., ProfileStore],
) -> None:
    store = make_store()
    assert isinstance(store, ProfileStore)
    store.put_many([_record(1), _record(2)])
    assert [s.trace_id for s in store.list()] == [f"{3:032x}", f"{2:032x}"]
    store.put_many([])
    assert store.stats() == (2, 20)


def test_put_many_refuses_the_whole_batch_when_one_record_is_too_large(
    make_store: Callable[..., ProfileStore],
) -> None:
    store = make_store(max_bytes=100)
    store.put(_record(1))
    with pytest.raises(ValueError, match="exceeds the store's max_bytes"):
        store.put_many([_record(2), _record(3, size=101)])
    assert store.stats() == (1, 10), "nothing of the batch was written"


def test_put_many_replaces_and_evicts_once_after_the_batch(
    make_store: Callable[..., ProfileStore],
) -> None:
    store = make_store(max_profiles=2)
    store.put(_record(1))
    # The batch holds a newer copy of record 1 and two new records: eviction after the
    # batch drops the oldest by start time, whichever write it came from.
    store.put_many([_record(2), _record(1, size=30, start=2000.0), _record(3)])
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
    summary = _record(5).summary
    assert _base.matches(summary, "/r", 5.0, 1005.0, 1005.0)
    assert not _base.matches(summary, "/other", None, None, None)
    assert not _base.matches(summary, None, 5.5, None, None)
    assert not _base.matches(summary, None, None, 1005.5, None)
    assert not _base.matches(summary, None, None, None, 1004.5)
