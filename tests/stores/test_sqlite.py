"""SQLiteStore: its URL, the file, its schema migration and sharing it between processes
(the ProfileStore contract it shares with the other stores: ``test_protocol.py``)."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyinstrument.renderers import ConsoleRenderer
from pyinstrument.session import Session

from otelprof_middleware._record import ProfileRecord
from otelprof_middleware.stores import ProfileStore, SQLiteStore, _sqlite_connection, open_store
from otelprof_middleware.stores import sqlite as sqlite_module
from tests.helpers import (
    in_threads,
    make_record,
    make_summary,
    package_env,
    profile,
    summary_numbers,
)
from tests.stores.checks import integrity_and_totals, raw_sqlite


def sqlite_store_profiled_work() -> None:
    end = time.perf_counter() + 0.02
    while time.perf_counter() < end:
        sum(range(200))


@pytest.fixture(scope="module")
def session() -> Session:
    return profile(sqlite_store_profiled_work)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "profiles.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[SQLiteStore]:
    opened = SQLiteStore(db_path)
    yield opened
    opened.close()


# -- URL and path ------------------------------------------------------------------


def test_is_a_profile_store(store: SQLiteStore, db_path: Path) -> None:
    assert isinstance(store, ProfileStore)
    assert store.url == "sqlite:///" + str(db_path)
    assert store.url.startswith("sqlite:////")


@pytest.mark.parametrize("path", ["", ":memory:"])
def test_rejects_non_file_paths(path: str) -> None:
    with pytest.raises(ValueError, match="file path"):
        SQLiteStore(path)


# -- the file ----------------------------------------------------------------------


def test_file_settings(store: SQLiteStore, db_path: Path) -> None:
    store.put(make_record(1))
    conn = raw_sqlite(db_path)
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
    store.put(make_record(1))
    assert stat.S_IMODE(db_path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    wal = db_path.with_name(db_path.name + "-wal")
    assert wal.exists()
    assert stat.S_IMODE(wal.stat().st_mode) == 0o600


def test_persists_across_reopen(db_path: Path, session: Session) -> None:
    record = ProfileRecord.from_session(make_summary(1), session)
    first = SQLiteStore(db_path)
    first.put(record)
    first.close()

    second = SQLiteStore(db_path)
    try:
        assert second.get(record.summary.trace_id) == [record]
        assert second.stats() == (1, record.size)
    finally:
        second.close()


def test_a_deleted_file_is_created_again(store: SQLiteStore, db_path: Path) -> None:
    """Deleting the store while the app runs (``rm`` of the state directory, a tmp
    cleaner) must not leave the workers writing into the deleted file, where no viewer,
    `otelprof ls` or newly started worker would ever see their profiles again."""
    other_worker = SQLiteStore(db_path)  # a second process's connection to the same file
    try:
        store.put(make_record(1))
        other_worker.put(make_record(2))
        for path in db_path.parent.iterdir():
            path.unlink()
        db_path.parent.rmdir()

        store.put(make_record(3))
        other_worker.put(make_record(4))

        assert stat.S_IMODE(db_path.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
        reader = SQLiteStore(db_path)  # `otelprof ls`, or a worker started since
        try:
            assert summary_numbers(reader.list()) == [4, 3]
        finally:
            reader.close()
        assert summary_numbers(store.list()) == [4, 3]
        assert store.stats() == (2, 200)
    finally:
        other_worker.close()
    assert integrity_and_totals(db_path) == ("ok", (2, 200), (2, 200))


def test_relative_path_is_resolved_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = SQLiteStore("rel/profiles.db")
    try:
        assert store.path == str(tmp_path / "rel" / "profiles.db")
        monkeypatch.chdir("/")
        store.put(make_record(1))
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
    conn = raw_sqlite(db_path)
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


def test_read_only_reads_what_a_writer_writes_and_never_writes(
    store: SQLiteStore, db_path: Path
) -> None:
    store.put(make_record(0))
    reader = SQLiteStore(db_path, read_only=True)
    try:
        assert [s.trace_id for s in reader.list()] == [f"{1:032x}"]
        store.put(make_record(1))
        assert len(reader.list()) == 2 and reader.stats()[0] == 2
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            reader.put(make_record(2))
        assert store.stats()[0] == 2
    finally:
        reader.close()


def test_read_only_never_creates_or_migrates(tmp_path: Path, db_path: Path) -> None:
    later = tmp_path / "later" / "profiles.db"
    reader = SQLiteStore(later, read_only=True)  # (a viewer started before the apps)
    try:
        with pytest.raises(sqlite3.OperationalError, match="does not exist yet"):
            reader.list()
        assert not later.parent.exists()
        writer = SQLiteStore(later)
        writer.put(make_record(0))
        writer.close()
        assert len(reader.list()) == 1
    finally:
        reader.close()
    _create_v1_file(db_path)  # an older file, lacking the columns added since
    with pytest.raises(sqlite3.DatabaseError, match="found version 1 with columns missing"):
        SQLiteStore(db_path, read_only=True)
    assert "kept_reason" not in _columns(db_path)


def test_open_store_round_trips_the_url(store: SQLiteStore) -> None:
    store.put(make_record(1))
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
    common = [str(count), str(max_profiles), str(payload_file), str(go)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(db_path), str(w), *common],
            env=package_env(),
            stderr=subprocess.PIPE,
        )
        for w in (1, 2)
    ]
    go.touch()
    for proc in procs:
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr.decode()


def test_two_processes_write_concurrently(tmp_path: Path, db_path: Path, session: Session) -> None:
    payload = ProfileRecord.from_session(make_summary(0), session).payload
    _run_writers(tmp_path, db_path, payload, count=150, max_profiles=1000)

    assert integrity_and_totals(db_path) == (
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

    assert integrity_and_totals(db_path) == ("ok", (40, 2000), (40, 2000))
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

    def worker(t: int) -> None:
        for i in range(40):
            n = t * 1000 + i
            store.put(make_record(n, payload=b"t" * (10 + n % 13)))
            if i % 5 == 0:
                store.list(limit=5, order="slowest")
                store.get(f"{n + 1:032x}")

    errors = in_threads(worker, 8)
    try:
        assert errors == []
        count, total = store.stats()
        assert count == 150
    finally:
        store.close()
    assert integrity_and_totals(db_path) == ("ok", (150, total), (150, total))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_opens_its_own_connection(store: SQLiteStore, db_path: Path) -> None:
    store.put(make_record(1))
    parent_conn = store._connection._conn
    assert parent_conn is not None

    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            store.put(make_record(2))
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
    assert integrity_and_totals(db_path) == ("ok", (2, 200), (2, 200))


def test_pid_change_without_fork_hooks_reopens(store: SQLiteStore) -> None:
    store.put(make_record(1))
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
        store.put_many([make_record(n, start_time=1000.0 + n) for n in range(8)])
        kept = store.list(limit=100)
        assert [s.start_time for s in kept] == [1007.0, 1006.0, 1005.0, 1004.0, 1003.0]
        assert store.stats() == (5, 500)
        assert integrity_and_totals(tmp_path / "many.db")[0] == "ok"
    finally:
        store.close()


# -- kept_reason and the schema migration --------------------------------------------


def test_kept_reason_is_a_column(store: SQLiteStore, db_path: Path) -> None:
    # Its round trip through put, put_many and list: test_protocol.py.
    reasons = ["slow", "error", "triggered", "min_duration", ""]
    store.put(make_record(1, kept_reason=reasons[0]))
    store.put_many([make_record(n, kept_reason=r) for n, r in enumerate(reasons[1:], 2)])
    conn = raw_sqlite(db_path)
    try:
        stored = conn.execute("SELECT kept_reason FROM profiles ORDER BY start_time").fetchall()
    finally:
        conn.close()
    assert [r for (r,) in stored] == reasons


def test_fresh_file_keeps_payload_the_last_column(store: SQLiteStore, db_path: Path) -> None:
    conn = raw_sqlite(db_path)
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
    s = make_summary(n, sample_count=3, mode="always_on", interval_ms=5.0)
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
    conn = raw_sqlite(path)
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
    conn = raw_sqlite(path)
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
        assert old[0] == make_summary(2, sample_count=3, mode="always_on", interval_ms=5.0)
        [old_record] = store.get(old[1].trace_id)
        assert old_record.payload == b"o" * 40
        assert store.stats() == (2, 80)
        # New rows store their reason, alongside the old ones.
        new = make_record(3, kept_reason="error")
        store.put(new)
        assert store.get(new.summary.trace_id) == [new]
        assert [s.kept_reason for s in store.list()] == ["error", "", ""]
        # A worker still running the old version keeps writing (kept_reason defaults).
        conn = raw_sqlite(db_path)
        try:
            conn.execute(_OLD_INSERT_V1, _old_row(4))
        finally:
            conn.close()
        assert [s.kept_reason for s in store.list()] == ["", "error", "", ""]
        assert store.stats() == (4, 220)
    finally:
        store.close()
    conn = raw_sqlite(db_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == sqlite_module.SCHEMA_VERSION
    finally:
        conn.close()
    assert integrity_and_totals(db_path) == ("ok", (4, 220), (4, 220))

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
        store.put(make_record(2, kept_reason="slow"))
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
    workers = range(6)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _OPENER, str(db_path), str(w), str(go)],
            env=package_env(),
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
    assert integrity_and_totals(db_path) == ("ok", (8, 140), (8, 140))
    store = SQLiteStore(db_path)
    try:
        assert sorted(s.kept_reason for s in store.list(route="/m")) == [f"w{w}" for w in workers]
        assert [s.kept_reason for s in store.list(route="/items/{item_id}")] == ["", ""]
    finally:
        store.close()


def test_a_store_dropped_unclosed_closes_its_connection(tmp_path: Path) -> None:
    """The middlewares' shared stores are held weakly, so a store whose apps are gone is
    collected without ``close()``. Its connection is closed then, not left to sqlite3,
    which warns about a connection collected open (ResourceWarning, Python 3.13): an
    error, through pytest's unraisable-exception check, in a suite run with ``-W error``."""
    import gc

    store = SQLiteStore(str(tmp_path / "p.db"))
    with store._connection.locked() as conn:
        conn.execute("SELECT 1")
    del store
    gc.collect()
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        conn.execute("SELECT 1")
