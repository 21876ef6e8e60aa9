"""The SQLite store's schema and statements, derived from the summary's declaration.

The ``profiles`` table has one column per field of
:class:`~otelprof_middleware._record.ProfileSummary` (in declaration order), then
``size`` and ``payload``: ``payload`` last, so that reading the index fields of a row
never touches the payload's overflow pages. Fields declared ``ADDED`` get a column
default (what rows of older files read as) and are added in place to files created
before them (the migration in ``stores/_sqlite_connection.py``).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .. import _clock
from .._record import SUMMARY_FIELDS, FieldValue, ProfileRecord, ProfileSummary, SummaryField

__all__ = [
    "ADDED_COLUMNS",
    "BUSY_TIMEOUT_MS",
    "INSERT",
    "PAYLOAD_INDEX",
    "SCHEMA",
    "SCHEMA_VERSION",
    "SUMMARY_COLUMNS",
    "evict",
    "immediate",
    "list_query",
    "retry_busy",
    "row",
    "summary",
    "totals",
    "user_version",
]

SCHEMA_VERSION = 1
"""Stored in ``PRAGMA user_version``; a file with a newer version is refused."""

BUSY_TIMEOUT_MS = 5000
"""How long a statement waits for another process's write lock before failing."""

_SQL_TYPES = {str: "TEXT", int: "INTEGER", float: "REAL"}


def _literal(value: FieldValue) -> str:
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return repr(value)


def _declaration(field: SummaryField) -> str:
    """``TEXT NOT NULL`` and, for a field added after the first format, its default."""
    text = f"{_SQL_TYPES[field.type]} NOT NULL"
    if field.default is not None:
        text += f" DEFAULT {_literal(field.default)}"
    return text


_COLUMNS = ",\n        ".join(f"{f.name} {_declaration(f)}" for f in SUMMARY_FIELDS)
_KEY = ", ".join(f.name for f in SUMMARY_FIELDS if f.identity)

SCHEMA = (
    f"""
    CREATE TABLE IF NOT EXISTS profiles (
        {_COLUMNS},
        size INTEGER NOT NULL,
        payload BLOB NOT NULL,
        PRIMARY KEY ({_KEY})
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
"""The statements that create a fresh file (schema version 1 plus every added column)."""

ADDED_COLUMNS: tuple[tuple[str, str], ...] = tuple(
    (f.name, _declaration(f)) for f in SUMMARY_FIELDS if f.default is not None
)
"""``(name, declaration)`` of the columns added after schema version 1 was released.

They are added in place (``ALTER TABLE ... ADD COLUMN``) to files created before them,
without changing ``user_version``: the addition is backward compatible (older versions
name their columns and get the default), so old and new worker processes can share one
file during a rolling deploy. In such a file the column comes after ``payload``; a fresh
file has it before ``payload``.
"""

SUMMARY_COLUMNS = ", ".join(f.name for f in SUMMARY_FIELDS)
"""The summary's columns, in the order :func:`summary` reads them."""

PAYLOAD_INDEX = len(SUMMARY_FIELDS)
"""Where ``payload`` is in a row of ``SELECT {SUMMARY_COLUMNS}, payload``."""

INSERT = (
    f"INSERT INTO profiles ({SUMMARY_COLUMNS}, size, payload) "
    f"VALUES ({', '.join('?' * (len(SUMMARY_FIELDS) + 2))})"
)


def row(record: ProfileRecord) -> tuple[Any, ...]:
    """The parameters of :data:`INSERT` for ``record``."""
    s = record.summary
    return (*(getattr(s, f.name) for f in SUMMARY_FIELDS), record.size, record.payload)


def summary(values: Sequence[Any]) -> ProfileSummary:
    """The summary in a row that starts with :data:`SUMMARY_COLUMNS`."""
    return ProfileSummary(*values[:PAYLOAD_INDEX])


def list_query(
    limit: int,
    route: str | None,
    min_duration_ms: float | None,
    since: float | None,
    until: float | None,
    order: str,
) -> tuple[str, list[Any]]:
    """The ``SELECT`` of the summaries :meth:`SQLiteStore.list` returns, and its
    parameters."""
    clauses: list[str] = []
    params: list[Any] = []
    for clause, value in (
        ("route = ?", route),
        ("duration_ms >= ?", min_duration_ms),
        ("start_time >= ?", since),
        ("start_time <= ?", until),
    ):
        if value is not None:
            clauses.append(clause)
            params.append(value)
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    if order == "slowest":
        order_by = "duration_ms DESC, start_time DESC, rowid DESC"
    else:
        order_by = "start_time DESC, rowid DESC"
    params.append(limit)
    return f"SELECT {SUMMARY_COLUMNS} FROM profiles{where} ORDER BY {order_by} LIMIT ?", params


def evict(conn: sqlite3.Connection, max_profiles: int, max_bytes: int) -> None:
    """Delete the oldest rows until within both bounds (in the caller's transaction).

    Reads the running totals in O(1) and walks the ``start_time`` index from the oldest
    row only when over a bound, deleting only the rows it must.
    """
    count, total = totals(conn)
    if count <= max_profiles and total <= max_bytes:
        return
    doomed: list[tuple[int]] = []
    cursor = conn.execute("SELECT rowid, size FROM profiles ORDER BY start_time, rowid")
    try:
        for rowid, size in cursor:
            if count <= max_profiles and total <= max_bytes:
                break
            doomed.append((rowid,))
            count -= 1
            total -= size
    finally:
        cursor.close()
    conn.executemany("DELETE FROM profiles WHERE rowid = ?", doomed)


@contextlib.contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[None]:
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


def retry_busy(step: Callable[[], None]) -> None:
    """Run ``step``, retrying with backoff while SQLite reports BUSY or LOCKED without
    having waited (lock upgrades it refuses in order to avoid deadlock), for at most
    ``BUSY_TIMEOUT_MS``."""
    deadline = _clock.monotonic() + BUSY_TIMEOUT_MS / 1000
    delay = 0.001
    while True:
        try:
            step()
            return
        except sqlite3.OperationalError as exc:
            busy = exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
            if not busy or _clock.monotonic() >= deadline:
                raise
        _clock.sleep(delay)
        delay = min(delay * 2, 0.05)


def user_version(conn: sqlite3.Connection) -> int:
    """The file's ``PRAGMA user_version``."""
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def totals(conn: sqlite3.Connection) -> tuple[int, int]:
    """``(count, payload bytes)`` from the ``totals`` row the triggers keep."""
    count, total = conn.execute("SELECT count, bytes FROM totals WHERE id = 0").fetchone()
    return int(count), int(total)
