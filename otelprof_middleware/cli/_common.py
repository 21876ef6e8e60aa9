"""What the ``otelprof`` commands share: the exit with a message, the settings, the store,
and writing to stdout."""

from __future__ import annotations

import argparse
import errno
import os
import pwd
import sqlite3
import sys
from urllib.request import pathname2url

from .._config import Config
from ..stores import SQLiteStore, open_store
from ..stores._base import ProfileStore, redact_url

__all__ = ["CommandExit", "load_config", "open_profile_store", "store_url", "write_stdout"]


class CommandExit(Exception):
    """Stop the command with ``code``, printing ``message`` to stderr."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def load_config() -> Config:
    """The settings from the environment; a bad one exits with code 2."""
    try:
        return Config.load()
    except ValueError as exc:
        raise CommandExit(2, str(exc)) from None


def store_url(args: argparse.Namespace, config: Config) -> str:
    """``--store``, else the store the middleware would use with these settings."""
    url: str = args.store or config.resolved_store_url()
    return url


def open_profile_store(url: str, config: Config, *, must_exist: bool) -> ProfileStore:
    """Open the store at ``url``; exit 1 when it cannot be opened, 2 on a bad URL.

    ``must_exist``: an embedded SQLite store that is not there is an error (exit 1)
    rather than created empty.

    A SQLite store this process may not write (a read-only mount of the apps' state
    directory, a file of another user it may only read) is opened read-only: the
    commands and the viewer only read. ``serve`` may start before the apps have
    created it there; it reads it once they have.
    """
    shown = redact_url(url)
    if url.lower().startswith("memory:"):
        raise CommandExit(
            2,
            f"{shown}: a memory store lives inside the app's process (each worker its own) "
            "and no other process can read it; open the app's /debug/profile, or give the "
            "app a sqlite:/// or redis:// store",
        )
    path = ""
    if url.lower().startswith("sqlite:///"):
        path = url[len("sqlite:///") :]
        if path and "?" not in path:
            _check_sqlite_file(path, must_exist=must_exist)
    try:
        try:
            return open_store(
                url, max_profiles=config.store_max_profiles, max_bytes=config.store_max_bytes
            )
        except OSError as exc:
            if not path or not _read_only_here(exc, path):
                raise
            return SQLiteStore(
                path,
                max_profiles=config.store_max_profiles,
                max_bytes=config.store_max_bytes,
                read_only=True,
            )
    except (ValueError, ImportError) as exc:
        raise CommandExit(2, str(exc)) from None
    except Exception as exc:
        raise CommandExit(1, f"cannot open the profile store {shown}: {exc}") from None


def _read_only_here(exc: OSError, path: str) -> bool:
    """True when opening the store at ``path`` for writing failed because this process
    may not write there, though it may read: a read-only filesystem (the file may not
    exist yet), or a file it may not write."""
    if exc.errno == errno.EROFS:
        return not os.path.isdir(path)
    return exc.errno in (errno.EACCES, errno.EPERM) and os.path.isfile(path)


def _check_sqlite_file(path: str, *, must_exist: bool) -> None:
    """Exit 1 when ``path`` is missing (``must_exist``) or is a file but no store.

    Opening a store brings the file's schema up to date, which writes: a mistyped
    ``--store`` naming another SQLite database (or an empty file, which ``must_exist``
    commands only read) would get the store's tables and WAL mode. The file is read
    here without writing; a file SQLite cannot read is left to the store's own error.
    """
    where = os.path.abspath(path)
    try:
        os.stat(path)
    except PermissionError:
        # A state directory of the app's user (0700): os.path.exists says False, and
        # "nothing was profiled there yet" would send the reader the wrong way.
        raise CommandExit(1, _not_yours(where)) from None
    except OSError:
        pass
    if os.path.isfile(path) and not os.access(path, os.R_OK):
        raise CommandExit(1, _not_yours(where))  # SQLite: "unable to open database file"
    if not os.path.exists(path):
        if must_exist:
            raise CommandExit(
                1,
                f"no profile store at {where}: nothing was profiled there "
                "yet; pass --store or set OTELPROF_STORE (or OTELPROF_STATE_DIR / "
                "OTELPROF_SERVICE_NAME) to the app's",
            )
        return
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        if not must_exist:
            return  # serve may start the store there
        is_store = False
    else:
        try:
            is_store = _has_store_schema(where)
        except sqlite3.Error:
            return
    if not is_store:
        raise CommandExit(
            1,
            f"{where} is not an otelprof profile store (an empty file, or another "
            "SQLite database); it was left as it is: pass the app's store with --store",
        )


def _not_yours(where: str) -> str:
    """Why a store this user may not read cannot be opened, naming its owner."""
    place, owner = where, "<user>"
    while True:
        try:
            uid = os.stat(place).st_uid
        except OSError:
            if os.path.dirname(place) == place:
                break
            place = os.path.dirname(place)
            continue
        try:
            owner = pwd.getpwuid(uid).pw_name
        except KeyError:
            owner = f"#{uid}"
        break
    return (
        f"cannot read the profile store at {where}: permission denied ({place} belongs "
        f"to {owner}). The app keeps its state directory and store private to the user it "
        f"runs as: run otelprof as that user (sudo -u {owner} otelprof ...), or pass "
        "--store with a store you may read"
    )


def _has_store_schema(path: str) -> bool:
    """True when the SQLite file at ``path`` holds a store's schema (read-only)."""
    conn = sqlite3.connect(f"file:{pathname2url(path)}?mode=ro", uri=True)
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        table = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'profiles'"
        ).fetchone()
    finally:
        conn.close()
    return bool(version) and table is not None


def write_stdout(text: str) -> None:
    """Write to stdout as UTF-8 whatever the locale (the text format draws with
    box characters)."""
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:
        sys.stdout.write(text)
    else:
        sys.stdout.flush()
        buffer.write(text.encode("utf-8"))
    sys.stdout.flush()
