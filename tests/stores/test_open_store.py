"""open_store: one URL (OTELPROF_STORE) picks the backend."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pyinstrument.renderers import ConsoleRenderer

import otelprof_middleware.stores as stores
from otelprof_middleware._record import ProfileRecord
from otelprof_middleware.stores import MemoryStore, ProfileStore, SQLiteStore, open_store
from tests.helpers import make_summary, profile


def open_store_profiled_work() -> None:
    end = time.perf_counter() + 0.02
    while time.perf_counter() < end:
        sum(range(200))


def test_public_names() -> None:
    assert set(stores.__all__) == {
        "MemoryStore",
        "ProfileStore",
        "RedisStore",
        "SQLiteStore",
        "check_store_url",
        "open_store",
    }


def test_memory() -> None:
    store = open_store("memory://", max_profiles=7, max_bytes=4096)
    assert isinstance(store, MemoryStore)
    assert isinstance(store, ProfileStore)
    assert (store.max_profiles, store.max_bytes) == (7, 4096)
    assert store.url == "memory://"


def test_memory_scheme_is_case_insensitive() -> None:
    assert isinstance(open_store("MEMORY://"), MemoryStore)


def test_sqlite_absolute_path_has_four_slashes(tmp_path: Path) -> None:
    path = tmp_path / "state" / "profiles.db"
    store = open_store("sqlite:///" + str(path), max_profiles=3, max_bytes=2048)
    try:
        assert isinstance(store, SQLiteStore)
        assert store.path == str(path)
        assert (store.max_profiles, store.max_bytes) == (3, 2048)
        assert store.url == f"sqlite:///{path}"
        assert path.exists()
    finally:
        store.close()


def test_sqlite_three_slashes_is_relative(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_store("sqlite:///sub/profiles.db")
    try:
        assert isinstance(store, SQLiteStore)
        assert store.path == str(tmp_path / "sub" / "profiles.db")
    finally:
        store.close()


def test_opened_store_round_trips_a_real_profile(tmp_path: Path) -> None:
    summary = make_summary(
        trace_id="a" * 32,
        span_id="b" * 16,
        method="POST",
        route="/orders",
        status_code=201,
        duration_ms=20.0,
    )
    record = ProfileRecord.from_session(summary, profile(open_store_profiled_work))
    for url in ("memory://", f"sqlite:///{tmp_path / 'profiles.db'}"):
        store = open_store(url)
        try:
            store.put(record)
            [got] = store.get("a" * 32)
            text = ConsoleRenderer(unicode=False, color=False).render(got.session())
            assert "open_store_profiled_work" in text
        finally:
            store.close()


@pytest.mark.parametrize(
    "url",
    [
        "",
        "profiles.db",
        "/var/lib/profiles.db",
        "s3://bucket/profiles",
        "file:///tmp/profiles.db",
    ],
)
def test_unknown_or_missing_scheme_names_the_setting(url: str) -> None:
    with pytest.raises(ValueError, match="OTELPROF_STORE"):
        open_store(url)


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://",
        "sqlite:///",
        "sqlite://host/profiles.db",
        "sqlite:/profiles.db",
        "sqlite:///:memory:",
        "sqlite:///profiles.db?mode=ro",
        "memory:",
        "memory://name",
    ],
)
def test_malformed_urls(url: str) -> None:
    with pytest.raises(ValueError, match="OTELPROF_STORE"):
        open_store(url)


def test_bad_bounds_are_rejected() -> None:
    with pytest.raises(ValueError, match="max_profiles"):
        open_store("memory://", max_profiles=0)


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://profiles.db",
        "redis://127.0.0.1:notaport/0",
        "redis://127.0.0.1:6379/0?ttl=abc",
        "redis://127.0.0.1:6379/0?bogus_opt=1",
        "memory://x",
    ],
)
def test_check_store_url_refuses_at_once_without_opening(url: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="OTELPROF_STORE"):
        stores.check_store_url(url)


def test_check_store_url_opens_nothing(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "profiles.db"
    stores.check_store_url(f"sqlite:///{path}")
    stores.check_store_url("redis://127.0.0.1:1/0?ttl=60")  # nothing listens there
    assert not path.parent.exists()
