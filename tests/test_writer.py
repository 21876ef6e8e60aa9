from __future__ import annotations

from typing import Any

from pyinstrument.session import Session

from otelprof_middleware import counters
from otelprof_middleware.profiling._writer import ProfileWriter
from otelprof_middleware.stores import MemoryStore

from .helpers import make_summary, marker_alpha, profile, stalled_store


def _session() -> Session:
    return profile(lambda: marker_alpha(0.003), interval=0.0005)


def test_writes_in_the_background_and_flushes() -> None:
    store = MemoryStore()
    writer = ProfileWriter(lambda: store, queue_size=10)
    session = _session()
    for index in range(5):
        assert writer.submit(make_summary(index), session)
    assert writer.flush()
    writer.close()
    assert len(store.list()) == 5
    assert "marker_alpha" in store.get(make_summary(0).trace_id)[0].session().to_json().__repr__()
    assert counters()["written"] == 5


def test_drops_and_counts_when_the_queue_is_full() -> None:
    store, release, slow_store = stalled_store()
    writer = ProfileWriter(slow_store, queue_size=2)
    session = _session()
    accepted = [writer.submit(make_summary(index), session) for index in range(10)]
    # one item may already be in the writer's hands, two wait in the queue
    assert accepted.count(True) in (2, 3)
    assert counters()["dropped.queue_full"] == accepted.count(False)
    release.set()
    writer.close()
    assert len(store.list()) == accepted.count(True)


def test_drops_and_counts_when_the_waiting_profiles_hold_too_many_samples() -> None:
    """The queue is bounded by its profiles' samples too: long profiles waiting for a
    stalled store must not take the process's memory, however few they are."""
    store, release, get_store = stalled_store()
    session = _session()
    samples = len(session.frame_records)
    assert samples >= 3
    writer = ProfileWriter(get_store, queue_size=100, queued_samples=3 * samples)
    accepted = [writer.submit(make_summary(index), session) for index in range(10)]
    assert accepted == [True] * 3 + [False] * 7  # far below queue_size: the samples bound
    assert writer.held_samples() == 3 * samples
    assert counters()["dropped.queue_full"] == 7
    release.set()
    assert writer.flush()
    assert writer.held_samples() == 0  # written: their room is free again
    assert writer.submit(make_summary(10), session)
    writer.close()
    assert sorted(s.trace_id for s in store.list()) == [
        make_summary(n).trace_id for n in (0, 1, 2, 10)
    ]


def test_a_profile_larger_than_the_samples_bound_is_taken_when_none_waits() -> None:
    store, release, get_store = stalled_store()
    session = _session()
    writer = ProfileWriter(get_store, queue_size=10, queued_samples=1)
    assert writer.submit(make_summary(0), session)  # nothing held: taken, whatever its size
    assert not writer.submit(make_summary(1), session)
    release.set()
    writer.close()
    assert [s.trace_id for s in store.list()] == [make_summary(0).trace_id]


def test_profiles_taken_back_at_shutdown_free_their_samples() -> None:
    _, release, get_store = stalled_store()
    session = _session()
    writer = ProfileWriter(get_store, queue_size=10)
    for index in range(4):
        assert writer.submit(make_summary(index), session)
    taken = writer.take_queued()
    # one profile may be in the writer's hands already; the rest are taken back
    assert len(taken) in (3, 4)
    assert writer.held_samples() == (4 - len(taken)) * len(session.frame_records)
    release.set()
    writer.close()
    assert writer.held_samples() == 0


def test_a_failing_store_is_counted_and_the_writer_keeps_going() -> None:
    calls = 0
    store = MemoryStore()

    def flaky() -> MemoryStore:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise OSError("store offline")
        return store

    writer = ProfileWriter(flaky, queue_size=10)
    session = _session()
    for index in range(4):  # one at a time: each is its own batch
        writer.submit(make_summary(index), session)
        assert writer.flush()
    writer.close()
    assert counters()["failed.store.put"] == 2
    assert len(store.list()) == 2  # writing resumes once the store is back


def test_an_idle_writer_thread_exits_and_the_next_profile_starts_one(
    monkeypatch: Any,
) -> None:
    """A process that builds many apps (a test suite) keeps no idle thread per app."""
    from otelprof_middleware import _background

    monkeypatch.setattr(_background, "IDLE_SECONDS", 0.05)
    store = MemoryStore()
    writer = ProfileWriter(lambda: store, queue_size=10)
    session = _session()
    assert writer.submit(make_summary(0), session)
    assert writer.flush()
    first = writer._thread
    assert first is not None
    first.join(2.0)
    assert not first.is_alive()  # idle: gone
    assert writer.submit(make_summary(1), session)  # starts a new one
    assert writer.flush()
    assert {s.trace_id for s in store.list()} == {
        make_summary(0).trace_id,
        make_summary(1).trace_id,
    }
    writer.close()


def test_a_closed_writer_starts_again_with_the_next_profile() -> None:
    """``close()`` (the exit flush, or a test closing its app's writer) left the thread
    marked as running: every later profile was queued with no thread to write it."""
    store = MemoryStore()
    writer = ProfileWriter(lambda: store, queue_size=10)
    session = _session()
    assert writer.submit(make_summary(0), session) and writer.flush()
    writer.close()
    assert writer.submit(make_summary(1), session)
    assert writer.flush(2.0)
    assert len(store.list()) == 2
    writer.close()


_MANY_APPS = """
import atexit, gc, sys, weakref
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from otelprof_middleware import WSGIProfilingMiddleware

trace.set_tracer_provider(TracerProvider())

def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]

def call(middleware):
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "SERVER_NAME": "t",
               "SERVER_PORT": "80", "wsgi.url_scheme": "http", "REMOTE_ADDR": "127.0.0.1"}
    body = middleware(environ, lambda status, headers, exc_info=None: None)
    b"".join(body)
    body.close()

before = atexit._ncallbacks()
writers = []
for _ in range(300):  # a test suite's app factory: one middleware per test
    middleware = WSGIProfilingMiddleware(app, sample_rate=1.0, store=sys.argv[1])
    writers.append(weakref.ref(middleware.core.writer))
    del middleware
gc.collect()
print(atexit._ncallbacks() - before, sum(w() is not None for w in writers))
call(WSGIProfilingMiddleware(app, sample_rate=1.0, store=sys.argv[1]))  # kept, not flushed
"""


def test_an_app_per_test_adds_no_exit_hook_and_the_last_profile_is_written_at_exit(
    tmp_path: Any,
) -> None:
    """A suite that built 500 apps (one middleware each) had 505 atexit hooks, each holding
    its writer (and store settings) until exit. One hook drains them all, and holds none."""
    import subprocess
    import sys

    from otelprof_middleware.stores import SQLiteStore

    url = f"sqlite:///{tmp_path / 'profiles.db'}"
    done = subprocess.run(
        [sys.executable, "-c", _MANY_APPS, url], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    added_hooks, writers_alive = map(int, done.stdout.split())
    assert added_hooks <= 2, added_hooks  # (the sampler's, when it starts; none per app)
    assert writers_alive == 0
    assert len(SQLiteStore(str(tmp_path / "profiles.db")).list()) == 1  # drained at exit
