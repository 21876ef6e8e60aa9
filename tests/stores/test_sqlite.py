"""SQLiteStore: the ProfileStore contract, the file, and sharing it between processes."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyinstrument import Profiler
from pyinstrument.renderers import ConsoleRenderer
from pyinstrument.session import Session

import otelprof_middleware
from otelprof_middleware._record import ProfileRecord, ProfileSummary
from otelprof_middleware.stores import ProfileStore, SQLiteStore, _sqlite_connection, open_store
from otelprof_middleware.stores import sqlite as sqlite_module


def _leaf() -> int:
    return sum(range(200))


def sqlite_store_profiled_work() -> None:
    end = time.perf_counter() + 0.02
    while time.perf_counter() < end:
        _leaf()


@pytest.fixture(scope="module")
def session() -> Session:
    profiler = Profiler(interval=0.0001, async_mode="disabled")
    profiler.start()
    sqlite_store_profiled_work()
    return profiler.stop()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "profiles.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[SQLiteStore]:
    opened = SQLiteStore(db_path)
    yield opened
    opened.close()


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


def _raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def _integrity_and_totals(path: Path) -> tuple[str, tuple[int, int], tuple[int, int]]:
    """``(integrity_check, totals row, real count and byte sum)`` read independently."""
    conn = _raw(path)
    try:
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        totals = conn.execute("SELECT count, bytes FROM totals").fetchone()
        real = conn.execute("SELECT count(*), coalesce(sum(length(payload)), 0) FROM profiles")
        return integrity, tuple(totals), tuple(real.fetchone())
    finally:
        conn.close()


def _spans(summaries: object) -> list[int]:
    assert isinstance(summaries, list)
    return [int(s.span_id, 16) - 1 for s in summaries]


# -- contract --------------------------------------------------------------------


def test_is_a_profile_store(store: SQLiteStore, db_path: Path) -> None:
    assert isinstance(store, ProfileStore)
    assert store.url == "sqlite:///" + str(db_path)
    assert store.url.startswith("sqlite:////")


def test_round_trip_renders_the_profiled_function(store: SQLiteStore, session: Session) -> None:
    summary = _summary(1, sample_count=7, mode="timer", interval_ms=0.5, status_code=503)
    record = ProfileRecord.from_session(summary, session)
    store.put(record)

    [got] = store.get(summary.trace_id, summary.span_id)

    assert got == record
    text = ConsoleRenderer(unicode=False, color=False).render(got.session())
    assert "sqlite_store_profiled_work" in text


def test_get_by_span_and_unknown_ids(store: SQLiteStore) -> None:
    a = _record(1)
    b = _record(2, trace_id=a.summary.trace_id)
    store.put(a)
    store.put(b)

    assert store.get(a.summary.trace_id) == [b, a]  # newest first
    assert store.get(a.summary.trace_id, a.summary.span_id) == [a]
    assert store.get(a.summary.trace_id, "f" * 16) == []
    assert store.get("e" * 32) == []


def test_put_replaces_the_same_ids(store: SQLiteStore, db_path: Path) -> None:
    store.put(_record(1, payload=b"x" * 10))
    replacement = _record(1, payload=b"y" * 30, status_code=500)
    store.put(replacement)

    assert store.get(replacement.summary.trace_id) == [replacement]
    assert store.stats() == (1, 30)
    assert _integrity_and_totals(db_path) == ("ok", (1, 30), (1, 30))


def test_list_orders_and_filters(store: SQLiteStore) -> None:
    store.put(_record(1, duration_ms=50.0, route="/a"))
    store.put(_record(2, duration_ms=5.0, route="/b"))
    store.put(_record(3, duration_ms=500.0, route="/a"))
    store.put(_record(4, duration_ms=20.0, route="/a"))

    assert _spans(store.list()) == [4, 3, 2, 1]
    assert _spans(store.list(order="slowest")) == [3, 1, 4, 2]
    assert _spans(store.list(route="/a")) == [4, 3, 1]
    assert _spans(store.list(route="/nope")) == []
    assert _spans(store.list(min_duration_ms=20.0)) == [4, 3, 1]
    assert _spans(store.list(since=1_700_000_002.0, until=1_700_000_003.0)) == [3, 2]
    assert _spans(store.list(limit=2)) == [4, 3]
    assert _spans(store.list(limit=2, order="slowest", route="/a")) == [3, 1]
    assert _spans(store.list(limit=0)) == []
    assert store.list(limit=1)[0] == _summary(4, duration_ms=20.0, route="/a")


def test_list_rejects_bad_arguments(store: SQLiteStore) -> None:
    with pytest.raises(ValueError, match="order"):
        store.list(order="oldest")
    with pytest.raises(ValueError, match="limit"):
        store.list(limit=-1)


def test_delete(store: SQLiteStore, db_path: Path) -> None:
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
    assert _integrity_and_totals(db_path) == ("ok", (1, 100), (1, 100))


def test_evicts_oldest_by_count(db_path: Path) -> None:
    store = SQLiteStore(db_path, max_profiles=3)
    try:
        for n in (5, 1, 4, 2, 3):  # inserted out of start_time order
            store.put(_record(n))
        assert _spans(store.list()) == [5, 4, 3]
        assert store.stats() == (3, 300)

        store.put(_record(0))  # older than everything kept: evicted at once
        assert _spans(store.list()) == [5, 4, 3]
    finally:
        store.close()
    assert _integrity_and_totals(db_path) == ("ok", (3, 300), (3, 300))


def test_evicts_oldest_by_bytes(db_path: Path) -> None:
    store = SQLiteStore(db_path, max_bytes=2500)
    try:
        for n in range(5):
            store.put(_record(n, payload=b"z" * 1000))
        assert store.stats() == (2, 2000)
        assert _spans(store.list()) == [4, 3]
    finally:
        store.close()


def test_refuses_a_record_larger_than_max_bytes(db_path: Path) -> None:
    store = SQLiteStore(db_path, max_bytes=100)
    try:
        store.put(_record(1, payload=b"a" * 100))
        with pytest.raises(ValueError, match="max_bytes"):
            store.put(_record(2, payload=b"a" * 101))
        assert store.stats() == (1, 100)
    finally:
        store.close()


@pytest.mark.parametrize("bounds", [{"max_profiles": 0}, {"max_bytes": -1}])
def test_rejects_bad_bounds(db_path: Path, bounds: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        SQLiteStore(db_path, **bounds)


@pytest.mark.parametrize("path", ["", ":memory:"])
def test_rejects_non_file_paths(path: str) -> None:
    with pytest.raises(ValueError, match="file path"):
        SQLiteStore(path)


# -- the file ----------------------------------------------------------------------


def test_file_settings(store: SQLiteStore, db_path: Path) -> None:
    store.put(_record(1))
    conn = _raw(db_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == sqlite_module.SCHEMA_VERSION
        indexes = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        assert {
            "profiles_start_time",
            "profiles_route_start_time",
            "profiles_duration_ms",
        } <= indexes
    finally:
        conn.close()
    with store._connection.locked() as own:
        assert own.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        assert own.execute("PRAGMA busy_timeout").fetchone()[0] == 5000


def test_creates_private_directory_and_file(store: SQLiteStore, db_path: Path) -> None:
    store.put(_record(1))
    assert stat.S_IMODE(db_path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    wal = db_path.with_name(db_path.name + "-wal")
    assert wal.exists()
    assert stat.S_IMODE(wal.stat().st_mode) == 0o600


def test_persists_across_reopen(db_path: Path, session: Session) -> None:
    record = ProfileRecord.from_session(_summary(1), session)
    first = SQLiteStore(db_path)
    first.put(record)
    first.close()

    second = SQLiteStore(db_path)
    try:
        assert second.get(record.summary.trace_id) == [record]
        assert second.stats() == (1, record.size)
    finally:
        second.close()


def test_relative_path_is_resolved_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = SQLiteStore("rel/profiles.db")
    try:
        assert store.path == str(tmp_path / "rel" / "profiles.db")
        monkeypatch.chdir("/")
        store.put(_record(1))
        assert store.stats() == (1, 100)
    finally:
        store.close()


def test_garbage_file_raises_a_clear_error(db_path: Path) -> None:
    db_path.parent.mkdir()
    db_path.write_bytes(b"this is not a database, " * 200)
    with pytest.raises(sqlite3.DatabaseError, match="otelprof profile store"):
        SQLiteStore(db_path)


def test_newer_schema_version_is_refused(db_path: Path) -> None:
    SQLiteStore(db_path).close()
    conn = _raw(db_path)
    conn.execute(f"PRAGMA user_version = {sqlite_module.SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(sqlite3.DatabaseError, match="newer"):
        SQLiteStore(db_path)


def test_parent_that_is_a_file_raises(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    with pytest.raises(OSError):
        SQLiteStore(blocker / "profiles.db")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_directory_raises(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(OSError):
            SQLiteStore(locked / "profiles.db")
    finally:
        locked.chmod(0o700)


def test_use_after_close_raises_and_close_is_idempotent(store: SQLiteStore) -> None:
    store.close()
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.put(_record(1))


def test_open_store_round_trips_the_url(store: SQLiteStore) -> None:
    store.put(_record(1))
    again = open_store(store.url)
    try:
        assert isinstance(again, SQLiteStore)
        assert again.path == store.path
        assert again.stats() == (1, 100)
    finally:
        again.close()


# -- concurrency ---------------------------------------------------------------------

_WRITER = textwrap.dedent(
    """
    import os, sys, time
    from otelprof_middleware._record import ProfileRecord, ProfileSummary
    from otelprof_middleware.stores.sqlite import SQLiteStore

    path, worker, count, max_profiles, payload_file, go = sys.argv[1:]
    worker, count = int(worker), int(count)
    with open(payload_file, "rb") as f:
        payload = f.read()
    store = SQLiteStore(path, max_profiles=int(max_profiles))
    while not os.path.exists(go):
        time.sleep(0.001)
    for i in range(count):
        n = worker * 10_000 + i + 1
        summary = ProfileSummary(
            trace_id=f"{n:032x}", span_id=f"{n:016x}", method="GET", route=f"/w{worker}",
            status_code=200, duration_ms=float(i), start_time=1_700_000_000.0 + i,
        )
        store.put(ProfileRecord(summary=summary, payload=payload))
        if i % 10 == 0:
            store.list(limit=10)
    store.close()
    """
)


def _run_writers(
    tmp_path: Path, db_path: Path, payload: bytes, *, count: int, max_profiles: int
) -> None:
    payload_file = tmp_path / "payload.bin"
    payload_file.write_bytes(payload)
    go = tmp_path / "go"
    env = dict(os.environ)
    root = str(Path(next(iter(otelprof_middleware.__path__))).parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    common = [str(count), str(max_profiles), str(payload_file), str(go)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(db_path), str(w), *common],
            env=env,
            stderr=subprocess.PIPE,
        )
        for w in (1, 2)
    ]
    go.touch()
    for proc in procs:
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr.decode()


def test_two_processes_write_concurrently(tmp_path: Path, db_path: Path, session: Session) -> None:
    payload = ProfileRecord.from_session(_summary(0), session).payload
    _run_writers(tmp_path, db_path, payload, count=150, max_profiles=1000)

    assert _integrity_and_totals(db_path) == (
        "ok",
        (300, 300 * len(payload)),
        (300, 300 * len(payload)),
    )
    store = SQLiteStore(db_path)
    try:
        for worker in (1, 2):
            routes = store.list(route=f"/w{worker}", limit=1000)
            assert len(routes) == 150
        [record] = store.get(f"{10_000 + 1:032x}")
        text = ConsoleRenderer(unicode=False, color=False).render(record.session())
        assert "sqlite_store_profiled_work" in text
    finally:
        store.close()


def test_two_processes_stay_within_bounds(tmp_path: Path, db_path: Path) -> None:
    _run_writers(tmp_path, db_path, b"b" * 50, count=150, max_profiles=40)

    assert _integrity_and_totals(db_path) == ("ok", (40, 2000), (40, 2000))
    store = SQLiteStore(db_path)
    try:
        # Both writers put start times 0..149: the newest 20 of each survive.
        kept = store.list(limit=1000)
        assert sorted(s.start_time - 1_700_000_000.0 for s in kept) == sorted(
            [float(i) for i in range(130, 150)] * 2
        )
    finally:
        store.close()


def test_many_threads_put_concurrently(db_path: Path) -> None:
    store = SQLiteStore(db_path, max_profiles=150)
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for i in range(40):
                n = t * 1000 + i
                store.put(_record(n, payload=b"t" * (10 + n % 13)))
                if i % 5 == 0:
                    store.list(limit=5, order="slowest")
                    store.get(f"{n + 1:032x}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == []
        count, total = store.stats()
        assert count == 150
    finally:
        store.close()
    assert _integrity_and_totals(db_path) == ("ok", (150, total), (150, total))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_opens_its_own_connection(store: SQLiteStore, db_path: Path) -> None:
    store.put(_record(1))
    parent_conn = store._connection._conn
    assert parent_conn is not None

    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            store.put(_record(2))
            child_conn = store._connection._conn
            fresh = child_conn is not None and child_conn is not parent_conn
            both = len(store.get(f"{2:032x}")) == 1 and len(store.get(f"{3:032x}")) == 1
            store.close()
            code = 0 if fresh and both else 2
        finally:
            os._exit(code)

    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store._connection._conn is parent_conn
    assert store.stats() == (2, 200)
    assert _integrity_and_totals(db_path) == ("ok", (2, 200), (2, 200))


def test_pid_change_without_fork_hooks_reopens(store: SQLiteStore) -> None:
    store.put(_record(1))
    old = store._connection._conn
    store._connection._pid = -1  # as if forked by C code that bypassed os.register_at_fork
    try:
        assert store.stats() == (1, 100)
        assert store._connection._conn is not None and store._connection._conn is not old
        assert old in _sqlite_connection._ABANDONED
    finally:
        assert old is not None
        _sqlite_connection._ABANDONED.remove(old)
        old.close()


def test_put_many_writes_in_one_transaction_and_evicts(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "many.db"), max_profiles=5)
    try:
        store.put_many([_record(n, start_time=1000.0 + n) for n in range(8)])
        kept = store.list(limit=100)
        assert [s.start_time for s in kept] == [1007.0, 1006.0, 1005.0, 1004.0, 1003.0]
        assert store.stats() == (5, 500)
        assert _integrity_and_totals(tmp_path / "many.db")[0] == "ok"
    finally:
        store.close()


# -- kept_reason and the schema migration --------------------------------------------


def test_kept_reason_round_trips(store: SQLiteStore, db_path: Path) -> None:
    reasons = ["slow", "error", "triggered", "min_duration", ""]
    records = [_record(n, kept_reason=reason) for n, reason in enumerate(reasons, 1)]
    store.put(records[0])
    store.put_many(records[1:])

    for record in records:
        assert store.get(record.summary.trace_id) == [record]
    listed = store.list()
    assert [s.kept_reason for s in listed] == reasons[::-1]
    assert listed == [r.summary for r in records[::-1]]
    assert [s.kept_reason for s in store.list(order="slowest", route="/items/{item_id}")] == (
        reasons[::-1]  # equal durations: newest first
    )
    conn = _raw(db_path)
    try:
        stored = conn.execute("SELECT kept_reason FROM profiles ORDER BY start_time").fetchall()
    finally:
        conn.close()
    assert [r for (r,) in stored] == reasons


def test_fresh_file_keeps_payload_the_last_column(store: SQLiteStore, db_path: Path) -> None:
    conn = _raw(db_path)
    try:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(profiles)")]
    finally:
        conn.close()
    assert columns[-4:] == ["kept_reason", "service", "size", "payload"]


# The schema of version 1 as otelprof-middleware released it, before kept_reason:
# a file that version created. Copied here on purpose, never imported.
_OLD_SCHEMA_V1 = (
    """
    CREATE TABLE IF NOT EXISTS profiles (
        trace_id TEXT NOT NULL,
        span_id TEXT NOT NULL,
        start_time REAL NOT NULL,
        method TEXT NOT NULL,
        route TEXT NOT NULL,
        status_code INTEGER NOT NULL,
        duration_ms REAL NOT NULL,
        sample_count INTEGER NOT NULL,
        mode TEXT NOT NULL,
        interval_ms REAL NOT NULL,
        size INTEGER NOT NULL,
        payload BLOB NOT NULL,
        PRIMARY KEY (trace_id, span_id)
    )
    """,
    "CREATE INDEX IF NOT EXISTS profiles_start_time ON profiles (start_time)",
    "CREATE INDEX IF NOT EXISTS profiles_route_start_time ON profiles (route, start_time)",
    "CREATE INDEX IF NOT EXISTS profiles_duration_ms ON profiles (duration_ms)",
    """
    CREATE TABLE IF NOT EXISTS totals (
        id INTEGER PRIMARY KEY CHECK (id = 0),
        count INTEGER NOT NULL,
        bytes INTEGER NOT NULL
    )
    """,
    "INSERT OR IGNORE INTO totals (id, count, bytes) VALUES (0, 0, 0)",
    """
    CREATE TRIGGER IF NOT EXISTS profiles_totals_insert AFTER INSERT ON profiles BEGIN
        UPDATE totals SET count = count + 1, bytes = bytes + NEW.size WHERE id = 0;
    END
    """,
    """
    CREATE TRIGGER IF NOT EXISTS profiles_totals_delete AFTER DELETE ON profiles BEGIN
        UPDATE totals SET count = count - 1, bytes = bytes - OLD.size WHERE id = 0;
    END
    """,
    """
    CREATE TRIGGER IF NOT EXISTS profiles_totals_update AFTER UPDATE OF size ON profiles BEGIN
        UPDATE totals SET bytes = bytes - OLD.size + NEW.size WHERE id = 0;
    END
    """,
)

# How version 1 inserted a row (it names its columns, so it keeps working after the
# migration: kept_reason then takes its default).
_OLD_INSERT_V1 = (
    "INSERT INTO profiles (trace_id, span_id, start_time, method, route, status_code, "
    "duration_ms, sample_count, mode, interval_ms, size, payload) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _old_row(n: int, payload: bytes = b"o" * 40) -> tuple[object, ...]:
    s = _summary(n, sample_count=3, mode="always_on", interval_ms=5.0)
    return (
        s.trace_id,
        s.span_id,
        s.start_time,
        s.method,
        s.route,
        s.status_code,
        s.duration_ms,
        s.sample_count,
        s.mode,
        s.interval_ms,
        len(payload),
        payload,
    )


def _create_v1_file(path: Path, rows: int = 2) -> None:
    """A database as version 1 left it: its schema, user_version 1, WAL, some rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = _raw(path)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("BEGIN IMMEDIATE")
        for statement in _OLD_SCHEMA_V1:
            conn.execute(statement)
        conn.execute("PRAGMA user_version = 1")
        for n in range(1, rows + 1):
            conn.execute(_OLD_INSERT_V1, _old_row(n))
        conn.execute("COMMIT")
    finally:
        conn.close()


def _columns(path: Path) -> list[str]:
    conn = _raw(path)
    try:
        return [row[1] for row in conn.execute("PRAGMA table_info(profiles)")]
    finally:
        conn.close()


def test_file_of_the_old_schema_gains_kept_reason(db_path: Path) -> None:
    _create_v1_file(db_path, rows=2)
    assert "kept_reason" not in _columns(db_path)

    store = SQLiteStore(db_path)
    try:
        assert _columns(db_path).count("kept_reason") == 1
        assert _columns(db_path).count("service") == 1
        # Old rows read as "" (unknown); their other fields are intact.
        old = store.list()
        assert [s.kept_reason for s in old] == ["", ""]
        assert [s.service for s in old] == ["", ""]
        assert old[0] == _summary(2, sample_count=3, mode="always_on", interval_ms=5.0)
        [old_record] = store.get(old[1].trace_id)
        assert old_record.payload == b"o" * 40
        assert store.stats() == (2, 80)
        # New rows store their reason, alongside the old ones.
        new = _record(3, kept_reason="error")
        store.put(new)
        assert store.get(new.summary.trace_id) == [new]
        assert [s.kept_reason for s in store.list()] == ["error", "", ""]
        # A worker still running the old version keeps writing (kept_reason defaults).
        conn = _raw(db_path)
        try:
            conn.execute(_OLD_INSERT_V1, _old_row(4))
        finally:
            conn.close()
        assert [s.kept_reason for s in store.list()] == ["", "error", "", ""]
        assert store.stats() == (4, 220)
    finally:
        store.close()
    conn = _raw(db_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == sqlite_module.SCHEMA_VERSION
    finally:
        conn.close()
    assert _integrity_and_totals(db_path) == ("ok", (4, 220), (4, 220))

    reopened = SQLiteStore(db_path)  # a second open finds the column and leaves it alone
    try:
        assert _columns(db_path).count("kept_reason") == 1
        assert [s.kept_reason for s in reopened.list()] == ["", "error", "", ""]
    finally:
        reopened.close()


def test_migration_tolerates_a_column_added_concurrently(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process may add the column between our check and our ALTER TABLE: its
    "duplicate column name" error is not a failure."""
    _create_v1_file(db_path, rows=1)
    SQLiteStore(db_path).close()  # the "other process" migrates first
    # This process's checks saw the file before that: every check says "missing".
    monkeypatch.setattr(
        _sqlite_connection, "_missing_columns", lambda conn: [("kept_reason", "TEXT")]
    )

    store = SQLiteStore(db_path)
    try:
        store.put(_record(2, kept_reason="slow"))
        assert [s.kept_reason for s in store.list()] == ["slow", ""]
    finally:
        store.close()
    assert _columns(db_path).count("kept_reason") == 1


def test_migration_other_errors_still_raise(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _create_v1_file(db_path, rows=1)
    monkeypatch.setattr(
        _sqlite_connection,
        "_ADDED_COLUMNS",
        (("kept_reason", "TEXT NOT NULL DEFAULT ''"), ("x", "?!")),
    )
    with pytest.raises(sqlite3.DatabaseError, match="otelprof profile store"):
        SQLiteStore(db_path)
    assert "kept_reason" not in _columns(db_path), "the failed migration was rolled back"


_OPENER = textwrap.dedent(
    """
    import os, sys, time
    from otelprof_middleware._record import ProfileRecord, ProfileSummary
    from otelprof_middleware.stores.sqlite import SQLiteStore

    path, worker, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    while not os.path.exists(go):
        time.sleep(0.0005)
    store = SQLiteStore(path)
    n = 100 + worker
    store.put(ProfileRecord(
        summary=ProfileSummary(
            trace_id=f"{n:032x}", span_id=f"{n:016x}", method="GET", route="/m",
            status_code=200, duration_ms=1.0, start_time=1_700_001_000.0 + worker,
            kept_reason=f"w{worker}",
        ),
        payload=b"m" * 10,
    ))
    store.close()
    """
)


def test_processes_opening_an_old_file_at_once_migrate_it_once(
    tmp_path: Path, db_path: Path
) -> None:
    _create_v1_file(db_path, rows=2)
    go = tmp_path / "go-migrate"
    env = dict(os.environ)
    root = str(Path(next(iter(otelprof_middleware.__path__))).parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    workers = range(6)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _OPENER, str(db_path), str(w), str(go)],
            env=env,
            stderr=subprocess.PIPE,
        )
        for w in workers
    ]
    time.sleep(0.5)  # let them all start and wait for the same instant
    go.touch()
    for proc in procs:
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr.decode()

    assert _columns(db_path).count("kept_reason") == 1
    assert _integrity_and_totals(db_path) == ("ok", (8, 140), (8, 140))
    store = SQLiteStore(db_path)
    try:
        assert sorted(s.kept_reason for s in store.list(route="/m")) == [f"w{w}" for w in workers]
        assert [s.kept_reason for s in store.list(route="/items/{item_id}")] == ["", ""]
    finally:
        store.close()


def test_one_trace_across_services_sqlite(store: SQLiteStore) -> None:
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
