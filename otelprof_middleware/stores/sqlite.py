"""The embedded default store: one SQLite file in WAL mode, shared by worker processes.

:class:`SQLiteStore` keeps the store's methods; its connection (one per process,
fork-safe, configured and migrated when opened) is ``_sqlite_connection.py``'s, its
schema and statements are ``_sqlite_sql.py``'s.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .._record import ProfileRecord, ProfileSummary
from . import _sqlite_sql as sql
from ._base import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PROFILES,
    check_bounds,
    check_fits,
    check_list_args,
)
from ._sqlite_connection import ProcessConnection
from ._sqlite_sql import BUSY_TIMEOUT_MS, SCHEMA_VERSION

__all__ = ["BUSY_TIMEOUT_MS", "SCHEMA_VERSION", "SQLiteStore"]


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
        read_only: only read the store, opening the file read-only; it is never
            created or migrated, and :meth:`put`, :meth:`put_many` and :meth:`delete`
            raise ``sqlite3.OperationalError``. For readers that may not write the file
            (``otelprof serve`` or ``ls`` on a read-only mount of the apps' state
            directory); SQLite reads it while the apps write. A file that no app has
            created yet (or, on a read-only filesystem, has open) is opened at a later
            call; until then calls raise ``sqlite3.OperationalError`` saying so.

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
        *,
        read_only: bool = False,
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
        self._connection = ProcessConnection(self.path, self.url, read_only=read_only)

    # -- ProfileStore ----------------------------------------------------------

    def put(self, record: ProfileRecord) -> None:
        """Store ``record`` (replacing one with the same ids), then evict the oldest.

        Both happen in one ``BEGIN IMMEDIATE`` transaction, so concurrent writers in
        other processes see the bounds respected.

        Raises:
            ValueError: the record alone is larger than ``max_bytes``.
            sqlite3.Error: the database failed (locked too long, disk full, ...).
        """
        self.put_many([record])

    def put_many(self, records: Sequence[ProfileRecord]) -> None:
        """:meth:`put` for several records in one transaction (the writer's batches).

        Raises:
            ValueError: a record alone is larger than ``max_bytes`` (nothing is written).
            sqlite3.Error: the database failed.
        """
        for record in records:
            check_fits(record, self.max_bytes)
        with self._connection.locked() as conn, sql.immediate(conn):
            for record in records:
                s = record.summary
                # DELETE + INSERT rather than INSERT OR REPLACE: REPLACE's implicit delete
                # does not fire the totals trigger unless recursive_triggers is on.
                conn.execute(
                    "DELETE FROM profiles WHERE trace_id = ? AND span_id = ?",
                    (s.trace_id, s.span_id),
                )
                conn.execute(sql.INSERT, sql.row(record))
            sql.evict(conn, self.max_profiles, self.max_bytes)

    def get(self, trace_id: str, span_id: str | None = None) -> Sequence[ProfileRecord]:
        """The records of ``trace_id`` (only ``span_id``'s when given), newest first."""
        query = f"SELECT {sql.SUMMARY_COLUMNS}, payload FROM profiles WHERE trace_id = ?"
        params: list[Any] = [trace_id]
        if span_id is not None:
            query += " AND span_id = ?"
            params.append(span_id)
        query += " ORDER BY start_time DESC, rowid DESC"
        with self._connection.locked() as conn:
            rows = conn.execute(query, params).fetchall()
        return [
            ProfileRecord(summary=sql.summary(row), payload=bytes(row[sql.PAYLOAD_INDEX]))
            for row in rows
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
        query, params = sql.list_query(limit, route, min_duration_ms, since, until, order)
        with self._connection.locked() as conn:
            rows = conn.execute(query, params).fetchall()
        return [sql.summary(row) for row in rows]

    def delete(self, trace_id: str, span_id: str | None = None) -> int:
        """Delete the records of ``trace_id`` (only ``span_id``'s when given).

        Returns:
            How many records were deleted.
        """
        query = "DELETE FROM profiles WHERE trace_id = ?"
        params: list[Any] = [trace_id]
        if span_id is not None:
            query += " AND span_id = ?"
            params.append(span_id)
        with self._connection.locked() as conn, sql.immediate(conn):
            return conn.execute(query, params).rowcount

    def stats(self) -> tuple[int, int]:
        """``(count, total payload bytes)`` currently stored."""
        with self._connection.locked() as conn:
            return sql.totals(conn)

    def close(self) -> None:
        """Close this process's connection. Safe to call twice; other methods then raise
        ``RuntimeError``."""
        self._connection.close()
