"""The SQLite store's connection: one per process, shared by its threads under a lock.

Opening it creates the file (mode ``0o600``, its directory ``0o700``), configures the
connection (WAL, ``synchronous=NORMAL``, busy timeout) and brings the schema up to date:
a fresh file gets its tables, a file of an older version the columns it lacks
(``_sqlite_sql.ADDED_COLUMNS``). Fork-safe: a child process never uses the connection
it inherited; it opens its own on first use (detected by ``os.register_at_fork`` and by
a change of ``os.getpid()``). A file deleted or replaced since it was opened is opened
(created) again at the next use: SQLite would go on writing into the deleted file,
which nothing opened later would see.

A read-only connection (``read_only=True``: ``otelprof serve`` and the CLI on a store
they may not write, such as a read-only mount) opens the file with ``mode=ro`` and
neither creates, configures nor migrates it: SQLite reads a WAL file that way while the
apps write it, through the ``-shm`` and ``-wal`` files they keep. Where it may not
create those files itself (a read-only filesystem), it can read the file only while an
app has it open; and no app may have created it yet. Until then the connection is
opened again at each use.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import weakref
from collections.abc import Iterator
from urllib.request import pathname2url

from .._fork import in_child
from . import _sqlite_sql as sql
from ._sqlite_sql import BUSY_TIMEOUT_MS, SCHEMA_VERSION

__all__ = ["ProcessConnection"]

# Columns added after schema version 1, derived from the summary's declaration (see
# ``_sqlite_sql.ADDED_COLUMNS``); a module global here so the migration reads it at run time.
_ADDED_COLUMNS = sql.ADDED_COLUMNS

# Connections alive in this process, so a forked child can drop their inherited ones.
_LIVE: weakref.WeakSet[ProcessConnection] = weakref.WeakSet()

# Connections inherited from a parent process. SQLite must not use them in the child,
# and closing them there could disturb the parent's locks, so they are kept referenced
# (never closed, never garbage-collected) for the child's lifetime.
_ABANDONED: list[sqlite3.Connection] = []


def _after_fork_in_child() -> None:
    for connection in list(_LIVE):
        connection._forget_parent_connection()


in_child(_after_fork_in_child)


class ProcessConnection:
    """This process's connection to one store file, guarded by a lock.

    Creates the file and opens the connection at once, so a bad path or file fails in
    the store's constructor; after a fork, the child opens its own on first use.

    Args:
        path: the database file (an absolute path).
        url: the store's URL, for the error once closed.
        read_only: open the file read-only (``mode=ro``); never create it or bring its
            schema up to date. Writes then raise ``sqlite3.OperationalError``.

    Raises:
        OSError: the directory or file cannot be created.
        sqlite3.DatabaseError: the file is not a usable store.
    """

    def __init__(self, path: str, url: str, *, read_only: bool = False) -> None:
        self.path = path
        self.url = url
        self.read_only = read_only
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._file: tuple[int, int] | None = None  # (st_dev, st_ino) of the opened file
        self._pid = os.getpid()
        self._closed = False
        # Read-only before any app opened the file: opened at a later use instead.
        with self._lock, contextlib.suppress(_NoAppHasItOpen):
            self._conn = self._open()
        _LIVE.add(self)

    @contextlib.contextmanager
    def locked(self) -> Iterator[sqlite3.Connection]:
        """This process's connection, held by the calling thread until the block ends.

        Raises:
            RuntimeError: :meth:`close` was called.
            sqlite3.DatabaseError: reopening it (in a forked child) failed.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError(f"the profile store {self.url} is closed")
            if self._pid != os.getpid():  # forked without os.fork's hooks
                if self._conn is not None:
                    _ABANDONED.append(self._conn)
                    self._conn = None
                self._pid = os.getpid()
            if self._conn is not None and self._file_replaced():
                # SQLite neither checkpoints nor deletes a moved file's WAL on close, so
                # closing cannot harm a new file at the same path.
                self._conn.close()
                self._conn = None
            if self._conn is None:
                self._conn = self._open()
            yield self._conn

    def close(self) -> None:
        """Close this process's connection (a parent's is left alone). Safe to call
        twice; :meth:`locked` then raises ``RuntimeError``."""
        with self._lock:
            if self._conn is not None:
                if self._pid == os.getpid():
                    self._conn.close()
                else:
                    _ABANDONED.append(self._conn)
                self._conn = None
            self._closed = True
        _LIVE.discard(self)

    def __del__(self) -> None:
        # A store no middleware uses any more is collected (the shared stores are held
        # weakly): close its connection rather than leave that to sqlite3, which warns
        # about it (ResourceWarning, Python 3.13) under a test suite's ``-W error``.
        with contextlib.suppress(Exception):
            self.close()

    def _file_replaced(self) -> bool:
        """True when ``path`` no longer names the file the connection has open."""
        try:
            now = os.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return True
        return (now.st_dev, now.st_ino) != self._file

    def _create_file(self) -> None:
        directory = os.path.dirname(self.path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        # Create the file ourselves so it gets 0o600; SQLite gives the -wal and -shm
        # files the same mode as the database file.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)

    def _open(self) -> sqlite3.Connection:
        if not self.read_only:
            self._create_file()
        try:
            created = os.stat(self.path)  # (replaced before the connect: reopened at next use)
        except FileNotFoundError:
            if not self.read_only:
                raise
            raise _NoAppHasItOpen(
                f"{self.path!r} does not exist yet: an app creates it with its first kept profile"
            ) from None
        self._file = (created.st_dev, created.st_ino)
        conn = sqlite3.connect(
            f"file:{pathname2url(self.path)}?mode=ro" if self.read_only else self.path,
            timeout=BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,  # autocommit; transactions are explicit
            check_same_thread=False,  # shared by threads under self._lock
            uri=self.read_only,
        )
        try:
            sql.retry_busy(lambda: (_check_read_only if self.read_only else _configure)(conn))
        except sqlite3.DatabaseError as exc:
            conn.close()
            opening = isinstance(exc, sqlite3.OperationalError)  # (not a schema check's)
            if self.read_only and opening and not os.path.exists(self.path + "-shm"):
                raise _NoAppHasItOpen(
                    f"cannot read {self.path!r} read-only yet ({exc}): SQLite reads a store "
                    "it may not write only while an app has it open (its -wal and -shm "
                    "files exist)"
                ) from exc
            raise type(exc)(
                f"cannot use {self.path!r} as the otelprof profile store: {exc}. Move the "
                "file away or point OTELPROF_STORE elsewhere."
            ) from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _forget_parent_connection(self) -> None:
        """In a forked child: drop the inherited lock and connection without using them."""
        self._lock = threading.Lock()
        if self._conn is not None:
            _ABANDONED.append(self._conn)
            self._conn = None
        self._pid = os.getpid()


def _configure(conn: sqlite3.Connection) -> None:
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    # Switching to WAL needs an exclusive lock; when two processes open a new file at
    # once, SQLite reports SQLITE_BUSY here without waiting (retry_busy does).
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    _migrate(conn)


class _NoAppHasItOpen(sqlite3.OperationalError):
    """A read-only store's file, or its ``-shm`` file, is not there yet, and this process
    may not create it."""


def _check_read_only(conn: sqlite3.Connection) -> None:
    """A read-only connection's set-up: the file must already be a current store."""
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    version = sql.user_version(conn)
    if version != SCHEMA_VERSION or _missing_columns(conn):
        raise sqlite3.DatabaseError(
            f"opened read-only, it must be a store of schema version {SCHEMA_VERSION}, "
            f"found version {version}{' with columns missing' if version else ''}; an app "
            "of this version writing to it brings it up to date"
        )


def _migrate(conn: sqlite3.Connection) -> None:
    if sql.user_version(conn) != SCHEMA_VERSION:
        with sql.immediate(conn):
            version = sql.user_version(conn)  # another process may have just created it
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"schema version {version} is newer than this otelprof-middleware "
                    f"supports ({SCHEMA_VERSION})"
                )
            if version < SCHEMA_VERSION:
                for statement in sql.SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    if _missing_columns(conn):
        _add_columns(conn)


def _missing_columns(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    present = {row[1] for row in conn.execute("PRAGMA table_info(profiles)")}
    return [column for column in _ADDED_COLUMNS if column[0] not in present]


def _add_columns(conn: sqlite3.Connection) -> None:
    """Add the columns a file created by an older version lacks.

    Several worker processes may open such a file at once: the check is repeated under
    the write lock (``BEGIN IMMEDIATE``), so only the first adds a column, and a
    "duplicate column name" error (another process added it first) is ignored anyway.
    """
    with sql.immediate(conn):
        for name, declaration in _missing_columns(conn):
            try:
                conn.execute(f"ALTER TABLE profiles ADD COLUMN {name} {declaration}")
            except sqlite3.OperationalError as exc:
                if "duplicate column name" not in str(exc).lower():
                    raise
