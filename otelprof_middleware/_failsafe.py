"""Fail open: catch, count and log (rate-limited) every internal failure.

Nothing in the profiler, store, writer or renderer may fail or slow the user's
request. Each risky step runs under ``with fail_open("stage"):``.

What an app's signal handler raises is not a failure of ours, though it may surface in
our code: CPython runs a Python signal handler between any two bytecodes of the main
thread, ours included, and an alarm-based timeout (``signal.alarm`` and a handler that
raises) must reach the app as it would without us. :func:`log_failure` (so
:func:`fail_open`) re-raises it, as :func:`raised_by_signal_handler` tells it.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import signal
import threading
import types
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from . import _clock
from ._fork import in_child, notice_fork

__all__ = [
    "count",
    "fail_open",
    "log_event",
    "log_failure",
    "log_once",
    "raised_by_signal_handler",
    "reset_counters",
    "snapshot",
    "tally",
]

logger = logging.getLogger("otelprof_middleware")

LOG_INTERVAL_SECONDS = 60.0
"""A failure of one stage is logged at most once per this many seconds."""

_lock = threading.Lock()
_counts: Counter[str] = Counter()  # counted under the lock (tallies are not)
_last_logged: dict[str, float] = {}
_said: set[str] = set()  # the notices :func:`log_once` has given in this process


def count(name: str, amount: int = 1) -> None:
    """Add ``amount`` to the counter ``name`` (e.g. ``"dropped.queue_full"``)."""
    with _lock:
        _counts[name] += amount


_tallies: dict[str, itertools.count[int]] = {}
_tally_offsets: dict[str, int] = {}  # a tally's value at the last reset


def tally(name: str) -> Callable[[], int]:
    """A lock-free "add one to ``name``", for counters bumped on every request.

    ``next()`` of an ``itertools.count`` is atomic under the GIL, and costs a fraction
    of :func:`count`'s lock. Its value shows in :func:`snapshot` like any counter.
    """
    with _lock:
        counter = _tallies.setdefault(name, itertools.count(1))
    return counter.__next__


def _tally_value(counter: itertools.count[int]) -> int:
    # repr is ``count(N)``, N the next value: the only public way to read one.
    return int(repr(counter)[6:-1]) - 1


def snapshot() -> dict[str, int]:
    """A copy of all counters, for metrics pages and tests."""
    notice_fork()  # a worker forked by C code (uWSGI) counts from zero too
    with _lock:
        values = dict(_counts)
        for name, counter in _tallies.items():
            value = _tally_value(counter) - _tally_offsets.get(name, 0)
            if value:
                values[name] = values.get(name, 0) + value
        return values


def reset_counters() -> None:
    """Clear counters and the log rate limiter (tests use this)."""
    with _lock:
        _counts.clear()
        _last_logged.clear()
        _said.clear()
        for name, counter in _tallies.items():
            _tally_offsets[name] = _tally_value(counter)


def _after_fork_in_child() -> None:
    """A forked child counts from zero and gets the lock back unlocked.

    Each worker process reports its own counters (docs/configuration.md): a gunicorn
    ``--preload`` app that served requests in the master before forking (a warm-up) gave
    every worker the master's counts. And the lock is taken by the writer and sampler
    threads: one that held it at ``fork()`` left it held for good in the child, whose
    first count then waited forever. The child logs its own failures too (the rate
    limiter restarts); the once-per-process notices stay said.
    """
    global _lock
    _lock = threading.Lock()
    _counts.clear()
    _last_logged.clear()
    for name, counter in _tallies.items():
        _tally_offsets[name] = _tally_value(counter)


in_child(_after_fork_in_child)


def _due(stage: str) -> bool:
    """True when ``stage`` was not logged within the last interval (and mark it logged)."""
    now = _clock.monotonic()
    with _lock:
        last = _last_logged.get(stage)
        if last is not None and 0.0 <= now - last < LOG_INTERVAL_SECONDS:
            return False  # (a clock that went back, frozen by a test: logged again)
        _last_logged[stage] = now
        return True


def log_event(stage: str, message: str, *args: object) -> None:
    """Log a warning about ``stage`` at most once per interval (counting is the caller's)."""
    if _due(stage):
        logger.warning(message, *args)


def log_once(notice: str, message: str, *args: object) -> None:
    """Log a warning about ``notice`` once per process (again after :func:`reset_counters`).

    For a fact about the process's setup, not a failure: an app factory that builds an
    app per test must not repeat it for every app it builds.
    """
    with _lock:
        if notice in _said:
            return
        _said.add(notice)
    logger.warning(message, *args)


def raised_by_signal_handler(exc: BaseException) -> bool:
    """Whether ``exc`` came out of a Python signal handler other than ours (an app's
    alarm-based timeout, say), run between two bytecodes of the code it unwound.

    Read on failures only: it asks the ``signal`` module for every handler. Never
    raises (False when it cannot tell, as at interpreter exit, modules torn down).
    """
    try:
        return _in_a_signal_handler(exc)
    except Exception:
        return False


def _in_a_signal_handler(exc: BaseException) -> bool:
    tb = exc.__traceback__
    if tb is None or threading.current_thread() is not threading.main_thread():
        return False  # (Python signal handlers run on the main thread only)
    handlers: set[types.CodeType] = set()
    for signum in signal.valid_signals():
        try:
            handler = signal.getsignal(signum)
        except (ValueError, OSError):
            continue
        while isinstance(handler, functools.partial):
            handler = handler.func
        code = getattr(getattr(handler, "__func__", handler), "__code__", None)
        if code is None and callable(handler):  # a callable object
            code = getattr(type(handler).__call__, "__code__", None)
        if isinstance(code, types.CodeType) and not code.co_filename.startswith(_OUR_DIR):
            handlers.add(code)
    while tb is not None:
        if tb.tb_frame.f_code in handlers:
            return True
        tb = tb.tb_next
    return False


_OUR_DIR = os.path.dirname(__file__) + os.sep  # (our SIGPROF handler's exceptions are ours)


def log_failure(stage: str, exc: BaseException) -> None:
    """Count a failure of ``stage`` and log it unless it was logged recently.

    Raises:
        BaseException: ``exc`` itself, when an app's signal handler raised it
            (:func:`raised_by_signal_handler`): it is the app's, not a failure.
    """
    if raised_by_signal_handler(exc):
        raise exc
    with _lock:
        _counts[f"failed.{stage}"] += 1
    if not _due(stage):
        return
    logger.warning(
        "otelprof: %s failed (%s: %s); %s. "
        "Further %s failures are counted and logged at most once per %.0f s.",
        stage,
        type(exc).__name__,
        exc,
        _consequence(stage),
        stage,
        LOG_INTERVAL_SECONDS,
        exc_info=exc,
    )


def _consequence(stage: str) -> str:
    """What a failure of ``stage`` cost, in the words of the log line."""
    if stage.startswith(("store.", "writer.", "exporter.")):
        return "the profile was taken but is not kept; the request was not affected"
    if stage.startswith(("pyroscope.", "otlp_profiles.")):
        return "the profile was not exported (otelprof's store has it); no request was affected"
    if stage.startswith("viewer"):
        return "the viewer answered with an error page; the app was not affected"
    return "the request goes on unprofiled"


@contextmanager
def fail_open(stage: str) -> Iterator[None]:
    """Run the block; on ``Exception``, count and log it and carry on.

    ``BaseException`` (cancellation, ``KeyboardInterrupt``) is never swallowed.
    """
    try:
        yield
    except Exception as exc:
        log_failure(stage, exc)
