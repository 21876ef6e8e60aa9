"""The embedded default store: one SQLite file in WAL mode, shared by worker processes."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .._record import ProfileRecord, ProfileSummary
from .memory import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PROFILES,
    check_bounds,
    check_fits,
    check_list_args,
)

__all__ = ["BUSY_TIMEOUT_MS", "SCHEMA_VERSION", "SQLiteStore"]

SCHEMA_VERSION = 1
"""Stored in ``PRAGMA user_version``; a file with a newer version is refused."""

BUSY_TIMEOUT_MS = 5000
"""How long a statement waits for another process's write lock before failing."""

_SCHEMA = (
    # ``payload`` is the last column so that reading the index fields of a row never
    # touches the payload's overflow pages.
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
        kept_reason TEXT NOT NULL DEFAULT '',
        service TEXT NOT NULL DEFAULT '',
        size INTEGER NOT NULL,
        payload BLOB NOT NULL,
        PRIMARY KEY (trace_id, span_id)
    )
    """,
    "CREATE INDEX IF NOT EXISTS profiles_start_time ON profiles (start_time)",
    "CREATE INDEX IF NOT EXISTS profiles_route_start_time ON profiles (route, start_time)",
    "CREATE INDEX IF NOT EXISTS profiles_duration_ms ON profiles (duration_ms)",
    # Running count and byte total, kept by triggers so put() need not scan the table.
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

# Columns added to ``profiles`` after schema version 1 was released, as
# ``(name, declaration)``. They are added in place (``ALTER TABLE ... ADD COLUMN``) to
# files created before them, without changing ``user_version``: the addition is
# backward compatible (older versions name their columns and get the default), so old
# and new worker processes can share one file during a rolling deploy. In such a file
# the column comes after ``payload``; a fresh file has it before ``payload``.
_ADDED_COLUMNS = (
    ("kept_reason", "TEXT NOT NULL DEFAULT ''"),
    ("service", "TEXT NOT NULL DEFAULT ''"),
)

_SUMMARY_COLUMNS = (
    "trace_id, span_id, method, route, status_code, duration_ms, start_time, "
    "sample_count, mode, interval_ms, kept_reason, service"
)
_PAYLOAD_INDEX = 12  # of payload, after _SUMMARY_COLUMNS in get()'s SELECT

_INSERT = (
    "INSERT INTO profiles (trace_id, span_id, start_time, method, route, status_code, "
    "duration_ms, sample_count, mode, interval_ms, kept_reason, service, size, payload) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

# Stores alive in this process, so a forked child can drop their inherited connections.
_LIVE_STORES: weakref.WeakSet[SQLiteStore] = weakref.WeakSet()

# Connections inherited from a parent process. SQLite must not use them in the child,
# and closing them there could disturb the parent's locks, so they are kept referenced
# (never closed, never garbage-collected) for the child's lifetime.
_ABANDONED: list[sqlite3.Connection] = []


def _after_fork_in_child() -> None:
    for store in list(_LIVE_STORES):
        store._forget_parent_connection()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class SQLiteStore:
    """Profiles in one SQLite file, shared by the worker processes of one host.

    The embedded default store (``OTELPROF_STORE=sqlite:///path/profiles.db``): zero
    setup, safe for several gunicorn/uvicorn worker processes and threads at once.
    The file runs in WAL mode (readers never block the writer) with
    ``synchronous=NORMAL`` and a busy timeout of ``BUSY_TIMEOUT_MS``. The parent
    directory is created with mode ``0o700`` and the file with ``0o600``. Only the
    record's own fields are stored.

    Connections: each store holds **one connection per process, guarded by a
    lock**. SQLite admits one writer at a time anyway, the background writer is the
    only frequent caller, and a single connection can be closed deterministically by
    :meth:`close` (per-thread connections would outlive their threads). Across
    processes, SQLite's file locks and ``BEGIN IMMEDIATE`` transactions keep writers
    correct. Fork-safe: a child process never uses the connection it inherited; it
    opens its own on first use (detected by ``os.register_at_fork`` and by a change
    of ``os.getpid()``).

    Eviction: a ``totals`` row kept by triggers holds the count and byte total, so
    each :meth:`put` reads it in O(1) and, when over a bound, walks the
    ``start_time`` index from the oldest row, deleting only the rows it must
    (O(evicted)); all in the put's transaction.

    Args:
        path: the database file; relative paths are resolved against the current
            directory once, here.
        max_profiles: keep at most this many records (``OTELPROF_STORE_MAX_PROFILES``,
            default ``1000``).
        max_bytes: keep at most this many compressed payload bytes
            (``OTELPROF_STORE_MAX_BYTES``, default 64 MiB). A single record larger
            than this is refused with ``ValueError`` instead of emptying the store.

    Raises:
        OSError: the directory or file cannot be created.
        sqlite3.DatabaseError: the file is not a usable store (corrupt, not SQLite,
            written by a newer schema version, locked beyond the busy timeout).

    Example::

        store = SQLiteStore("/var/lib/otelprof/api/profiles.db")
        store.put(record)
        newest = store.list(limit=20)
        store.close()
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_profiles: int = DEFAULT_MAX_PROFILES,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        check_bounds(max_profiles, max_bytes)
        text = os.fspath(path)
        if not text or text == ":memory:":
            raise ValueError(
                f"SQLiteStore needs a file path, got {text!r}; use MemoryStore for an "
                "in-process store"
            )
        self.path = os.path.abspath(text)
        self.url = "sqlite:///" + self.path
        self.max_profiles = max_profiles
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = os.getpid()
        self._closed = False
        self._create_file()
        with self._lock:
            self._conn = self._open()
        _LIVE_STORES.add(self)

    # -- connection management -------------------------------------------------

    def _create_file(self) -> None:
        directory = os.path.dirname(self.path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        # Create the file ourselves so it gets 0o600; SQLite gives the -wal and -shm
        # files the same mode as the database file.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path,
            timeout=BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,  # autocommit; transactions are explicit
            check_same_thread=False,  # shared by threads under self._lock
        )
        try:
            _retry_busy(lambda: self._configure(conn))
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise type(exc)(
                f"cannot use {self.path!r} as the otelprof profile store: {exc}. Move the "
                "file away or point OTELPROF_STORE elsewhere."
            ) from exc
        except BaseException:
            conn.close()
            raise
        return conn

    @classmethod
    def _configure(cls, conn: sqlite3.Connection) -> None:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        # Switching to WAL needs an exclusive lock; when two processes open a new file
        # at once, SQLite reports SQLITE_BUSY here without waiting (_retry_busy does).
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        cls._migrate(conn)

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        if _user_version(conn) != SCHEMA_VERSION:
            with _immediate(conn):
                version = _user_version(conn)  # another process may have just created it
                if version > SCHEMA_VERSION:
                    raise sqlite3.DatabaseError(
                        f"schema version {version} is newer than this otelprof-middleware "
                        f"supports ({SCHEMA_VERSION})"
                    )
                if version < SCHEMA_VERSION:
                    for statement in _SCHEMA:
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        if _missing_columns(conn):
            _add_columns(conn)

    def _forget_parent_connection(self) -> None:
        """In a forked child: drop the inherited lock and connection without using them."""
        self._lock = threading.Lock()
        if self._conn is not None:
            _ABANDONED.append(self._conn)
            self._conn = None
        self._pid = os.getpid()

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"the profile store {self.url} is closed")
            if self._pid != os.getpid():  # forked without os.fork's hooks
                if self._conn is not None:
                    _ABANDONED.append(self._conn)
                    self._conn = None
                self._pid = os.getpid()
            if self._conn is None:
                self._conn = self._open()
            yield self._conn

    def close(self) -> None:
        """Close this process's connection. Safe to call twice; other methods then raise
        ``RuntimeError``."""
        with self._lock:
            if self._conn is not None:
                if self._pid == os.getpid():
                    self._conn.close()
                else:
                    _ABANDONED.append(self._conn)
                self._conn = None
            self._closed = True
        _LIVE_STORES.discard(self)

    # -- ProfileStore ----------------------------------------------------------

    def put(self, record: ProfileRecord) -> None:
        """Store ``record`` (replacing one with the same ids), then evict the oldest.

        Both happen in one ``BEGIN IMMEDIATE`` transaction, so concurrent writers in
        other processes see the bounds respected.

        Raises:
            ValueError: the record alone is larger than ``max_bytes``.
            sqlite3.Error: the database failed (locked too long, disk full, ...).
        """
        check_fits(record, self.max_bytes)
        s = record.summary
        row = _row(record)
        with self._connection() as conn, _immediate(conn):
            # DELETE + INSERT rather than INSERT OR REPLACE: REPLACE's implicit delete
            # does not fire the totals trigger unless recursive_triggers is on.
            conn.execute(
                "DELETE FROM profiles WHERE trace_id = ? AND span_id = ?",
                (s.trace_id, s.span_id),
            )
            conn.execute(_INSERT, row)
            self._evict(conn)

    def put_many(self, records: Sequence[ProfileRecord]) -> None:
        """:meth:`put` for several records in one transaction (the writer's batches).

        Raises:
            ValueError: a record alone is larger than ``max_bytes`` (nothing is written).
            sqlite3.Error: the database failed.
        """
        for record in records:
            check_fits(record, self.max_bytes)
        with self._connection() as conn, _immediate(conn):
            for record in records:
                s = record.summary
                conn.execute(
                    "DELETE FROM profiles WHERE trace_id = ? AND span_id = ?",
                    (s.trace_id, s.span_id),
                )
                conn.execute(_INSERT, _row(record))
            self._evict(conn)

    def _evict(self, conn: sqlite3.Connection) -> None:
        count, total = _totals(conn)
        if count <= self.max_profiles and total <= self.max_bytes:
            return
        doomed: list[tuple[int]] = []
        cursor = conn.execute("SELECT rowid, size FROM profiles ORDER BY start_time, rowid")
        try:
            for rowid, size in cursor:
                if count <= self.max_profiles and total <= self.max_bytes:
                    break
                doomed.append((rowid,))
                count -= 1
                total -= size
        finally:
            cursor.close()
        conn.executemany("DELETE FROM profiles WHERE rowid = ?", doomed)

    def get(self, trace_id: str, span_id: str | None = None) -> Sequence[ProfileRecord]:
        """The records of ``trace_id`` (only ``span_id``'s when given), newest first."""
        sql = f"SELECT {_SUMMARY_COLUMNS}, payload FROM profiles WHERE trace_id = ?"
        params: list[Any] = [trace_id]
        if span_id is not None:
            sql += " AND span_id = ?"
            params.append(span_id)
        sql += " ORDER BY start_time DESC, rowid DESC"
        with self._connection() as conn:
            rows = conn.execute(sql, params).fetchall()
        return [
            ProfileRecord(summary=_summary(row), payload=bytes(row[_PAYLOAD_INDEX])) for row in rows
        ]

    def list(
        self,
        *,
        limit: int = 100,
        route: str | None = None,
        min_duration_ms: float | None = None,
        since: float | None = None,
        until: float | None = None,
        order: str = "newest",
    ) -> Sequence[ProfileSummary]:
        """Summaries matching the filters, ``"newest"`` or ``"slowest"`` first.

        Reads only the indexed summary columns, never the payloads.

        Args:
            limit: at most this many summaries (``0`` gives none).
            route: only this route template (exact match).
            min_duration_ms: only requests that took at least this long.
            since: only ``start_time >= since`` (epoch seconds).
            until: only ``start_time <= until`` (epoch seconds).
            order: ``"newest"`` (start time, descending) or ``"slowest"``
                (duration, descending; ties newest first).

        Returns:
            The matching summaries.

        Raises:
            ValueError: ``order`` is unknown or ``limit`` is negative.
        """
        check_list_args(limit, order)
        clauses: list[str] = []
        params: list[Any] = []
        if route is not None:
            clauses.append("route = ?")
            params.append(route)
        if min_duration_ms is not None:
            clauses.append("duration_ms >= ?")
            params.append(min_duration_ms)
        if since is not None:
            clauses.append("start_time >= ?")
            params.append(since)
        if until is not None:
            clauses.append("start_time <= ?")
            params.append(until)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        if order == "slowest":
            order_by = "duration_ms DESC, start_time DESC, rowid DESC"
        else:
            order_by = "start_time DESC, rowid DESC"
        sql = f"SELECT {_SUMMARY_COLUMNS} FROM profiles{where} ORDER BY {order_by} LIMIT ?"
        params.append(limit)
        with self._connection() as conn:
            rows = conn.execute(sql, params).fetchall()
        return [_summary(row) for row in rows]

    def delete(self, trace_id: str, span_id: str | None = None) -> int:
        """Delete the records of ``trace_id`` (only ``span_id``'s when given).

        Returns:
            How many records were deleted.
        """
        sql = "DELETE FROM profiles WHERE trace_id = ?"
        params: list[Any] = [trace_id]
        if span_id is not None:
            sql += " AND span_id = ?"
            params.append(span_id)
        with self._connection() as conn, _immediate(conn):
            return conn.execute(sql, params).rowcount

    def stats(self) -> tuple[int, int]:
        """``(count, total payload bytes)`` currently stored."""
        with self._connection() as conn:
            return _totals(conn)


@contextlib.contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """A ``BEGIN IMMEDIATE`` transaction: takes the write lock up front, so two
    processes never both read-then-write on stale totals."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise


def _retry_busy(step: Callable[[], None]) -> None:
    """Run ``step``, retrying with backoff while SQLite reports BUSY or LOCKED without
    having waited (lock upgrades it refuses in order to avoid deadlock), for at most
    ``BUSY_TIMEOUT_MS``."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    delay = 0.001
    while True:
        try:
            step()
            return
        except sqlite3.OperationalError as exc:
            busy = exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
            if not busy or time.monotonic() >= deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _missing_columns(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    present = {row[1] for row in conn.execute("PRAGMA table_info(profiles)")}
    return [column for column in _ADDED_COLUMNS if column[0] not in present]


def _add_columns(conn: sqlite3.Connection) -> None:
    """Add the columns a file created by an older version lacks.

    Several worker processes may open such a file at once: the check is repeated under
    the write lock (``BEGIN IMMEDIATE``), so only the first adds a column, and a
    "duplicate column name" error (another process added it first) is ignored anyway.
    """
    with _immediate(conn):
        for name, declaration in _missing_columns(conn):
            try:
                conn.execute(f"ALTER TABLE profiles ADD COLUMN {name} {declaration}")
            except sqlite3.OperationalError as exc:
                if "duplicate column name" not in str(exc).lower():
                    raise


def _totals(conn: sqlite3.Connection) -> tuple[int, int]:
    count, total = conn.execute("SELECT count, bytes FROM totals WHERE id = 0").fetchone()
    return int(count), int(total)


def _row(record: ProfileRecord) -> tuple[Any, ...]:
    s = record.summary
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
        s.kept_reason,
        s.service,
        record.size,
        record.payload,
    )


def _summary(row: Sequence[Any]) -> ProfileSummary:
    return ProfileSummary(
        trace_id=row[0],
        span_id=row[1],
        method=row[2],
        route=row[3],
        status_code=row[4],
        duration_ms=row[5],
        start_time=row[6],
        sample_count=row[7],
        mode=row[8],
        interval_ms=row[9],
        kept_reason=row[10],
        service=row[11],
    )
