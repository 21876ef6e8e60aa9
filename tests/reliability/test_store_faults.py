"""Store faults on a real SQLite file: locked, disk full, read-only, unusable directory.

The request path never touches the store (the background writer does), so none of
these may show in a response or make a request wait. Each fault is counted under
``failed.store.put``, logged once, and profiling resumes once the fault clears: the
core retries opening a store it could not open every ``STORE_RETRY_SECONDS``
(shortened here).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

from otelprof_middleware import _clock, _failsafe, counters
from otelprof_middleware.profiling import _store_opener
from otelprof_middleware.stores import SQLiteStore, _sqlite_connection

from .harness import (
    BATCH,
    Harness,
    Kind,
    assert_profiling_resumes,
    check_batch,
    logged_stages,
    record,
    send_batch,
)

MakeHarness = Callable[..., Harness]
RETRY_SECONDS = 0.05

_LOCKER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], timeout=0.1, isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()
conn.execute("ROLLBACK")
"""


@contextmanager
def write_lock_held(path: str) -> Iterator[subprocess.Popen[str]]:
    """Another process holds SQLite's write lock on ``path`` until the block ends."""
    locker = subprocess.Popen(
        [sys.executable, "-c", _LOCKER, path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
        yield locker
    finally:
        assert locker.stdin is not None
        locker.stdin.close()
        locker.wait(10)
        assert locker.stdout is not None
        locker.stdout.close()


@contextmanager
def tmpfs(path: Path, size: str, *, read_only: bool = False) -> Iterator[Path]:
    """A tiny tmpfs at ``path``; skips the test where mounting is not permitted."""
    path.mkdir()
    options = f"size={size},mode=0700" + (",ro" if read_only else "")
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"mount -t tmpfs refused here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True)


def _fill(directory: Path) -> Path:
    """Write a file until the filesystem is full."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def _close_store(harness: Harness) -> None:
    harness.core.writer.close()
    store = harness.core.store_opener.opened
    if store is not None:
        store.close()


def _stored(path: str) -> int:
    """How many profiles the file holds, read through a connection of our own."""
    with closing(sqlite3.connect(path, timeout=1)) as conn:
        return int(conn.execute("SELECT count(*) FROM profiles").fetchone()[0])


def _first_warning(caplog: pytest.LogCaptureFixture) -> str:
    return next(r.getMessage() for r in caplog.records if r.name == "otelprof_middleware")


@pytest.fixture
def fast_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_store_opener, "STORE_RETRY_SECONDS", RETRY_SECONDS)


def test_locked_database_makes_the_writer_wait_not_the_request(
    kind: Kind, harnesses: MakeHarness, tmp_path: Path
) -> None:
    """Busy timeout as shipped (5 s): requests finish while the lock is held; the
    writer waits and writes everything once the lock is gone."""
    store = SQLiteStore(tmp_path / "profiles.db")
    harness = harnesses(kind, store)
    try:
        with write_lock_held(store.path) as locker:
            result = send_batch(harness)
            record("SQLite locked (< busy timeout)", harness, result, counters())
            assert result.failures == []
            # Every request has been answered, and the lock is still held: nobody
            # answering a request waited for it.
            assert locker.poll() is None
            # Nothing written yet: the writer is still waiting for the lock. (Read with a
            # connection of our own: the store's one connection is the writer's now.)
            assert _stored(store.path) == 0
        assert harness.core.writer.flush(10)
        assert store.stats()[0] == len(BATCH)
        assert counters().get("failed.store.put", 0) == 0
    finally:
        harness.core.writer.close()
        store.close()


def test_locked_database_beyond_the_busy_timeout(
    kind: Kind,
    harnesses: MakeHarness,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Locked for longer than the busy timeout (shortened to 100 ms): each write fails,
    counted and logged once; writing resumes when the lock goes."""
    monkeypatch.setattr(_sqlite_connection, "BUSY_TIMEOUT_MS", 100)
    store = SQLiteStore(tmp_path / "profiles.db")
    harness = harnesses(kind, store)
    try:
        with write_lock_held(store.path):
            check_batch(
                "SQLite locked (> busy timeout)",
                harness,
                counter="failed.store.put",
                expected=len(BATCH),
                flush_timeout=20,
            )
        assert logged_stages(caplog) == ["store.put"]
        assert "database is locked" in _first_warning(caplog)
        assert _stored(store.path) == 0
        assert_profiling_resumes(harness)
    finally:
        _close_store(harness)
        store.close()


def test_state_dir_under_a_regular_file(
    kind: Kind,
    harnesses: MakeHarness,
    tmp_path: Path,
    fast_retry: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The store cannot be created (its directory's parent is a file): retried, then
    opened once the path is usable."""
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    harness = harnesses(kind, None, state_dir=str(blocker / "state"))
    try:
        check_batch(
            "state_dir parent is a regular file",
            harness,
            counter="failed.store.put",
            expected=len(BATCH),
        )
        assert logged_stages(caplog) == ["store.put"]
        assert harness.get("/debug/profile").status == 503
        blocker.unlink()
        blocker.mkdir()
        time.sleep(RETRY_SECONDS * 2)
        assert_profiling_resumes(harness)
        assert Path(harness.current_store().url.removeprefix("sqlite:///")).is_relative_to(
            blocker / "state"
        )
    finally:
        _close_store(harness)


def test_store_open_failure_logs_its_cause(
    kind: Kind, harnesses: MakeHarness, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    harness = harnesses(kind, None, state_dir=str(blocker / "state"))
    try:
        assert send_batch(harness, BATCH[:4]).failures == []
        assert harness.core.writer.flush(10)
        assert logged_stages(caplog) == ["store.put"]
        assert "NotADirectoryError" in _first_warning(caplog)
    finally:
        _close_store(harness)


def test_store_open_failure_keeps_its_cause_while_retries_wait(
    kind: Kind,
    harnesses: MakeHarness,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Between two attempts to open the store, its writes fail at once: the warning
    logged for them (once a minute, so nearly every one after the first) still says
    why the store cannot be opened, not only that it is unavailable."""
    monkeypatch.setattr(_failsafe, "LOG_INTERVAL_SECONDS", 0.0)  # log every failure
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    harness = harnesses(kind, None, state_dir=str(blocker / "state"))
    try:
        for _ in range(2):  # two writer batches: the open, then a write while it waits
            assert send_batch(harness, BATCH[:2]).failures == []
            assert harness.core.writer.flush(10)
        warnings = [
            r.getMessage()
            for r in caplog.records
            if r.name == "otelprof_middleware" and "store.put failed" in r.getMessage()
        ]
        assert len(warnings) >= 2
        assert "retrying every" in warnings[-1]
        assert all("NotADirectoryError" in message for message in warnings), warnings
    finally:
        _close_store(harness)


def test_state_dir_on_a_read_only_filesystem(
    kind: Kind,
    harnesses: MakeHarness,
    tmp_path: Path,
    fast_retry: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with tmpfs(tmp_path / "mnt", "1m", read_only=True) as mnt:
        harness = harnesses(kind, None, state_dir=str(mnt / "state"))
        try:
            check_batch(
                "state_dir on a read-only filesystem",
                harness,
                counter="failed.store.put",
                expected=len(BATCH),
            )
            assert logged_stages(caplog) == ["store.put"]
            _remount(mnt, "rw")
            time.sleep(RETRY_SECONDS * 2)
            assert_profiling_resumes(harness)
        finally:
            _close_store(harness)


def test_disk_full(
    kind: Kind, harnesses: MakeHarness, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The store's filesystem fills up: writes fail (SQLITE_FULL), requests do not;
    writing resumes when space is freed."""
    with tmpfs(tmp_path / "mnt", "1m") as mnt:
        harness = harnesses(kind, None, state_dir=str(mnt / "state"))
        try:
            assert harness.get("/cpu").status == 200  # opens the store, writes one profile
            assert harness.core.writer.flush(10)
            assert harness.current_store().stats()[0] == 1
            filler = _fill(mnt)
            seen = check_batch(
                "disk full (tmpfs)", harness, counter="failed.store.put", expected=1, at_least=True
            )
            assert seen.get("failed.store.put", 0) + seen["written"] == len(BATCH) + 1
            assert logged_stages(caplog) == ["store.put"]
            assert "database or disk is full" in _first_warning(caplog)
            filler.unlink()
            assert_profiling_resumes(harness)
        finally:
            _close_store(harness)


def test_a_clock_that_went_back_does_not_stop_the_store_from_opening(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store that failed to open under a frozen clock (freezegun patches
    ``time.monotonic``, years ahead) waited for its retry time on the real clock: never,
    in that process, and every later profile was lost."""
    from otelprof_middleware import Config

    real = time.monotonic()
    now = [real + 1.7e9]
    monkeypatch.setattr(_clock, "monotonic", lambda: now[0])
    blocker = tmp_path / "state"
    blocker.write_text("not a directory yet")
    opener = _store_opener.StoreOpener(Config.load(state_dir=str(blocker / "svc")))
    with pytest.raises(NotADirectoryError):
        opener.get()
    blocker.unlink()  # fixed meanwhile; and the test's clock is the real one again
    now[0] = real + 60.0
    store = opener.get()
    try:
        assert store.list() == []
    finally:
        store.close()  # type: ignore[attr-defined]
