"""A child forked while another thread of the parent holds one of the package's locks
gets that lock back unlocked: ``fork()`` copies a held lock as held, and the child's first
use of it would wait forever (a request forking while the sampler thread ticks, say)."""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable
from typing import Any

import pytest

from otelprof_middleware import Config, WSGIProfilingMiddleware, _failsafe
from otelprof_middleware.profiling import _store_opener
from otelprof_middleware.profiling._store_opener import StoreOpener
from otelprof_middleware.profiling._writer import ProfileWriter
from otelprof_middleware.profiling.always_on import AlwaysOnSampler
from otelprof_middleware.stores import MemoryStore

from .helpers import make_summary, marker_alpha, profile, stalled_store

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")


def _lock_getters() -> dict[str, Callable[[], Any]]:
    sampler = AlwaysOnSampler(0.005, sigprof=False)  # (no thread started, no timer)
    writer = ProfileWriter(MemoryStore, queue_size=1)
    opener = StoreOpener(Config.load({}, store="memory://"))
    store = MemoryStore()
    middleware = WSGIProfilingMiddleware(lambda environ, start_response: [], profile_store=store)
    return {
        "failure counters": lambda: _failsafe._lock,  # (rebound in the child: read late)
        "memory store": lambda: store._lock,
        "sampler tick": lambda: sampler._tick_lock,
        "sampler thread": lambda: sampler.thread._lock,
        "writer thread": lambda: writer._lock,
        "writer samples": lambda: writer._held_lock,
        "WSGI first-request check": lambda: middleware._inside_lock,
        "store opener": lambda: opener._lock,
        "shared stores": lambda: _store_opener._shared.lock,
    }


@pytest.mark.parametrize("which", list(_lock_getters()))
def test_a_child_forked_while_a_thread_holds_a_lock_can_take_it(which: str) -> None:
    lock = _lock_getters()[which]
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock():
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert held.wait(5)
    try:
        with warnings.catch_warnings():  # 3.12+: fork of a multi-threaded process
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:
            os._exit(0 if lock().acquire(timeout=2) else 1)
        _, status = os.waitpid(pid, 0)
    finally:
        release.set()
        holder.join(5)
    assert os.waitstatus_to_exitcode(status) == 0, f"the child could not take the {which} lock"


def test_a_forked_child_counts_from_zero() -> None:
    """A gunicorn ``--preload`` master that served requests (a warm-up) forks workers:
    each counts its own, from zero, and logs its own first failure."""
    count_not_kept = _failsafe.tally("test.tallied")
    _failsafe.count("written", 3)
    count_not_kept()
    _failsafe.log_failure("store.put", OSError("before the fork"))
    assert _failsafe.snapshot() == {"written": 3, "test.tallied": 1, "failed.store.put": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        ok = _failsafe.snapshot() == {} and _failsafe._due("store.put")
        _failsafe.count("written")
        count_not_kept()
        ok = ok and _failsafe.snapshot() == {"written": 1, "test.tallied": 1}
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child started from the parent's counts"
    assert _failsafe.snapshot() == {"written": 3, "test.tallied": 1, "failed.store.put": 1}


def test_a_forked_childs_writer_holds_none_of_the_parents_samples() -> None:
    """Profiles queued in the parent stay the parent's: a child that counted them as
    its own would refuse its own profiles once the parent's filled the samples bound."""
    _, release, get_store = stalled_store()
    session = profile(lambda: marker_alpha(0.003), interval=0.0005)
    samples = len(session.frame_records)
    writer = ProfileWriter(get_store, queue_size=10, queued_samples=2 * samples)
    try:
        assert writer.submit(make_summary(0), session)
        assert writer.submit(make_summary(1), session)
        assert not writer.submit(make_summary(2), session)  # the parent's bound is reached
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:
            release.set()  # (the child's own store answers at once)
            ok = writer.submit(make_summary(3), session)  # the parent's bound would refuse it
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
    finally:
        release.set()
        writer.close()
    assert os.waitstatus_to_exitcode(status) == 0, "the child counted the parent's samples"
