"""Tear-down of the package's process-wide state, for the test suites of apps that use it.

The middleware keeps a few things per process, not per instance: the always-on sampler
(with its signal handler, timer and thread), the background writers' threads, the failure
counters and the log rate limiter. A test suite that builds apps with different settings
can start each test from a clean process state::

    import pytest
    from otelprof_middleware import testing

    @pytest.fixture(autouse=True)
    def _otelprof_clean() -> None:
        testing.reset()

:func:`always_on_status` tells a test what the always-on sampler holds in this process
(whether ``SIGPROF`` is ours, the timer armed, the sampler thread running), without
reaching into the package's internals.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from . import _failsafe
from .profiling import always_on
from .profiling._at_exit import close_background

__all__ = ["AlwaysOnStatus", "always_on_status", "reset"]


@dataclass(frozen=True, slots=True)
class AlwaysOnStatus:
    """The process's always-on sampler, as :func:`always_on_status` saw it."""

    exists: bool  #: a sampler was created in this process (an always-on request came)
    interval_ms: float | None  #: its interval, the one in force for every middleware
    ticks: int  #: ticks it has taken so far
    sigprof_handler_is_ours: bool  #: the process's SIGPROF handler is the sampler's
    timer_armed: bool  #: its SIGPROF timer is armed in this process
    thread_alive: bool  #: its sampler thread (or watchdog) runs in this process
    main_loop_driven: bool  #: the main thread's event loop is ticked by SIGPROF


def always_on_status() -> AlwaysOnStatus:
    """What the always-on sampler holds in this process now."""
    sampler = always_on.current_sampler()
    if sampler is None:
        return AlwaysOnStatus(False, None, 0, False, False, False, False)
    main = sampler.registry.loops.get(threading.main_thread().ident or 0)
    return AlwaysOnStatus(
        exists=True,
        interval_ms=sampler.interval * 1000.0,
        ticks=sampler.samples,
        sigprof_handler_is_ours=sampler.sigprof.handler_is_ours(),
        timer_armed=sampler.timer_armed,
        thread_alive=sampler.thread.alive,
        main_loop_driven=main is not None and main.driven,
    )


def reset() -> None:
    """Stop and forget the always-on sampler (its timer disarmed, its thread ended), write
    out what the background writers hold and end their threads, and clear the counters,
    the log rate limiter and the once-per-process notices. Middlewares built afterwards
    start afresh; a middleware still serving requests starts a new sampler (and writer
    thread) when it needs one. After it, the package runs no thread: a test's check for
    leaked threads can call it first."""
    always_on.reset_for_tests()
    close_background()
    _failsafe.reset_counters()
