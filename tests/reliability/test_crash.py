"""Crash safety: ``kill -9`` gunicorn workers while they write profiles.

gunicorn runs the Flask demo (2 gthread workers, every request profiled, the embedded
SQLite store) under load from a thread pool. Worker processes (never the master) are
killed with SIGKILL at the instant they hold SQLite's write lock (mid-transaction, as
``/proc/locks`` shows), the master replaces them, the load goes on. Afterwards the
SQLite file must pass ``PRAGMA integrity_check``, its running totals must match its
rows, and every profile whose span was exported before a kill and that the store lists
must be readable and render.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from pyinstrument.renderers import ConsoleRenderer

from otelprof_middleware.stores import SQLiteStore

from ..e2e.servers import Server, gunicorn, run_server
from ..helpers import free_port
from .conftest import ARTIFACTS

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux /proc"),
]

PROFILE_URL = "otelprof.profile.url"
KILLS = 3
LOAD_THREADS = 8
PATHS = ("/cpu?ms=8", "/stream?chunks=40", "/io?ms=3", "/items/3", "/sync?rows=300")
SpanKey = tuple[str, str]


def _workers(master: int) -> set[int]:
    """The live child processes of ``master`` (gunicorn's workers)."""
    children = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == master and fields[0] != "Z":
            children.add(int(entry))
    return children


def _wait_for_workers(master: int, count: int, exclude: set[int]) -> set[int]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        workers = _workers(master) - exclude
        if len(workers) >= count:
            return workers
        time.sleep(0.05)
    raise AssertionError(f"gunicorn did not bring {count} workers up")


def _profiled_spans(server: Server) -> dict[SpanKey, int]:
    """Exported server spans that carry a profile link: (trace_id, span_id) -> worker pid."""
    spans: dict[SpanKey, int] = {}
    for path in server.spans_dir.glob("spans-*.jsonl"):
        pid = int(path.stem.removeprefix("spans-"))
        for line in path.read_text().splitlines():
            try:
                span = json.loads(line)
            except json.JSONDecodeError:  # a line being written (or cut by the kill)
                continue
            if span["kind"] == "SpanKind.SERVER" and PROFILE_URL in span["attributes"]:
                context = span["context"]
                key = (
                    context["trace_id"].removeprefix("0x"),
                    context["span_id"].removeprefix("0x"),
                )
                spans[key] = pid
    return spans


class Load:
    """A thread pool sending requests until stopped; counts outcomes."""

    def __init__(self, base_url: str) -> None:
        self._base_url = base_url
        self._stop = threading.Event()
        self.outcomes: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(LOAD_THREADS, thread_name_prefix="load")
        self._futures = [self._pool.submit(self._run, i) for i in range(LOAD_THREADS)]

    def _run(self, index: int) -> None:
        with httpx.Client(base_url=self._base_url, timeout=15) as client:
            sent = index
            while not self._stop.is_set():
                path = PATHS[sent % len(PATHS)]
                sent += 1
                try:
                    outcome = str(client.get(path).status_code)
                except httpx.TransportError as exc:  # the killed worker's connections
                    outcome = type(exc).__name__
                with self._lock:
                    self.outcomes[outcome] += 1

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return self.outcomes.copy()

    def stop(self) -> None:
        self._stop.set()
        for future in self._futures:
            future.result(30)
        self._pool.shutdown()


@contextmanager
def demo_server(tmp: Path) -> Iterator[Server]:
    port = free_port()
    command = gunicorn("demo_app.flask_app:app", port, workers=2, threads=4)
    env = {"OTELPROF_STORE_MAX_PROFILES": "1000000"}  # nothing evicted: every write counts
    with run_server(command, tmp, env=env, port=port) as server:
        yield server


def test_kill_9_workers_while_they_write_profiles(tmp_path: Path) -> None:
    with demo_server(tmp_path) as server:
        killed, before_kill, outcomes, last_second = _load_and_kill(server)
    # The workers were writing when killed: the store grew between kills.
    assert all(k["profiles_in_store_just_before"] > 0 for k in killed)
    assert killed[-1]["profiles_in_store_just_before"] > killed[0]["profiles_in_store_just_before"]
    # The replacement workers serve normally; only the killed workers' requests broke.
    assert set(last_second) == {"200"}, last_second
    assert set(outcomes) <= {"200", "RemoteProtocolError", "ReadError", "ConnectError"}, outcomes

    db_path = server.state_dir / "profiles.db"
    with closing(sqlite3.connect(db_path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM profiles").fetchone()
        assert conn.execute("SELECT count, bytes FROM totals").fetchone() == rows
    store = SQLiteStore(db_path)
    try:
        listed = {(s.trace_id, s.span_id) for s in store.list(limit=1_000_000)}
        assert len(listed) == rows[0]
        for trace_id, span_id in listed:  # every stored row decodes
            [stored] = store.get(trace_id, span_id)
            stored.session()
        written_before = sorted(key for key in before_kill if key in listed)
        renderer = ConsoleRenderer(unicode=False, color=False, show_all=True)
        for trace_id, span_id in written_before:
            [stored] = store.get(trace_id, span_id)
            assert renderer.render(stored.session()).strip()
        for kill in killed:
            own = kill.pop("its_spans_exported_before")
            kill["its_spans_exported_before"] = len(own)
            kill["its_profiles_in_store"] = sum(1 for key in own if key in listed)
        figures = {
            "kills": killed,
            "requests": dict(outcomes),
            "profiles_in_store_at_end": len(listed),
            "spans_with_profile_link_exported_before_a_kill": len(before_kill),
            "of_those_in_store_readable_and_rendered": len(written_before),
        }
    finally:
        store.close()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "crash.json").write_text(json.dumps(figures, indent=1) + "\n")
    assert len(written_before) > 0
    assert all(kill["its_profiles_in_store"] > 0 for kill in killed)
    assert sum(kill["held_the_sqlite_write_lock"] for kill in killed) >= 1


def _load_and_kill(
    server: Server,
) -> tuple[list[dict[str, Any]], dict[SpanKey, int], Counter[str], Counter[str]]:
    """Load the server and SIGKILL a writing worker ``KILLS`` times.

    Returns the kills, the profiled spans exported before each (key -> worker pid), the
    request outcomes, and the outcomes of the last second (after the last kill).
    """
    master = server.process.pid
    db_path = server.state_dir / "profiles.db"
    workers = _wait_for_workers(master, 2, set())
    load = Load(server.base_url)
    killed: list[dict[str, Any]] = []
    before_kill: dict[SpanKey, int] = {}
    try:
        for _ in range(KILLS):
            time.sleep(1.5)
            stored_then = _stored(db_path)
            exported = _profiled_spans(server)  # exported before this kill
            victim, held_lock = _kill_a_writing_worker(db_path, workers)
            before_kill.update(exported)
            killed.append(
                {
                    "pid": victim,
                    "held_the_sqlite_write_lock": held_lock,
                    "profiles_in_store_just_before": stored_then,
                    "spans_with_profile_link_exported_before": len(exported),
                    "its_spans_exported_before": [k for k, p in exported.items() if p == victim],
                }
            )
            workers = _wait_for_workers(master, 2, {victim})
        time.sleep(1.5)
        after = load.snapshot()
        time.sleep(1.0)
        last_second = load.snapshot() - after
    finally:
        load.stop()
    return killed, before_kill, load.snapshot(), last_second


def _kill_a_writing_worker(db_path: Path, workers: set[int]) -> tuple[int, bool]:
    """SIGKILL a worker the instant it holds SQLite's write lock (in a transaction).

    In WAL mode a writer holds a POSIX write lock on byte 120 of the ``-shm`` file for
    its whole transaction; ``/proc/locks`` shows who. Falls back to any worker (and says
    so) if none is seen writing within a few seconds.
    """
    inode = f":{os.stat(str(db_path) + '-shm').st_ino} "
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for line in Path("/proc/locks").read_text().splitlines():
            parts = line.split()
            if (
                len(parts) >= 8
                and parts[1:4] == ["POSIX", "ADVISORY", "WRITE"]
                and (parts[5] + " ").endswith(inode)
                and parts[6] == "120"
                and int(parts[4]) in workers
            ):
                os.kill(int(parts[4]), signal.SIGKILL)
                return int(parts[4]), True
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    return victim, False


def _stored(path: Path) -> int:
    if not path.exists():
        return 0
    with closing(sqlite3.connect(path, timeout=5)) as conn:
        return int(conn.execute("SELECT count FROM totals").fetchone()[0])
