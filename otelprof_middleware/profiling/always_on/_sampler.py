"""Always-on mode: a sampler per process, samples attributed per request.

pyinstrument's hook runs on every Python call, so a profiled call-heavy request runs
several times slower. Reading the threads' frames (``sys._current_frames()``) every
``interval`` costs time per sample instead (see docs/always-on.md). What
Pyroscope-style samplers lose, and this keeps, is *which request* each sample belongs
to:

* **event loop threads**: the asyncio task running at that moment is mapped to its
  request (``_registry``).
* **worker threads** (``def`` endpoints, ``run_in_threadpool``, executors): the job
  wrapper in ``_worker_threads`` registers the thread for the job's duration, with the
  stack that submitted it; the worker's frames are grafted under that stack.
* **WSGI threads**: the request's thread is registered until the body's ``close()``.

A registered request that is not running anywhere at a tick is waiting: the tick goes
to its ``[await]`` under the coroutine chain its task is suspended in.

The parts, each in its module: the registry of what runs where (``_registry``); what
ticks it, ``SIGPROF`` for an event loop on the main thread (``_sigprof``) and a thread
for anything else (``_thread``); what a tick sees (``_stacks``); the crediting
arithmetic between two ticks (``_ledger``). :class:`AlwaysOnSampler` holds them
together: registration in, ticks credited to the requests.
"""

from __future__ import annotations

import atexit
import logging
import random
import signal
import sys
import threading
import time
import types
from collections.abc import Callable
from typing import Any

from ... import _clock
from ..._failsafe import count, raised_by_signal_handler
from ..._fork import PROCESS, renew_locks_in_children
from .._request_profile import RequestProfile
from . import _ledger, _registry, _sigprof, _stacks, _thread
from ._cpu_timer import disarm_all
from ._ledger import Interval, Ledger, Running, add_time, close_wait
from ._registry import Job, LoopState, Registry, driven
from ._sigprof import SigprofDriver
from ._stacks import job_stack
from ._thread import SamplerThread

__all__ = [
    "AlwaysOnSampler",
    "always_on_sampler",
    "check_settings",
    "current_sampler",
    "reset_for_tests",
]

_logger = logging.getLogger("otelprof_middleware")


class AlwaysOnSampler:
    """The process's sampler: requests registered in, ticks credited to them.

    Registration calls come from the threads serving requests; ticks come from the
    sampler thread, the ``SIGPROF`` handler or a loop's ``call_later``, one at a time
    (a tick that finds another running is skipped).

    Args:
        interval: seconds between ticks (jittered between 0.5x and 1.5x).
        sigprof: drive a main-thread event loop with ``SIGPROF`` (when that signal is
            free); False: always the sampler thread.

    Its parts are public for diagnostics and tests: :attr:`registry`,
    :attr:`sigprof` (the handler and its timer), :attr:`thread`, :attr:`ledger`.
    """

    def __init__(self, interval: float, *, sigprof: bool = True) -> None:
        self.interval = interval
        self.registry = Registry()
        self.sigprof = SigprofDriver(self, enabled=sigprof)
        self.thread = SamplerThread(self)
        self.samples = 0
        self.pending_failures = 0  # failed ticks not yet counted (a handler takes no locks)
        self.last_tick = _clock.perf_counter()
        # The ticks' CPU budget: a tick's own CPU time (smoothed) over _TICK_BUDGET is the
        # least time between two ticks (see :meth:`tick`).
        self.tick_cpu = 0.0
        self.min_gap = 0.0
        self._tick_lock = threading.Lock()
        self.ledger = Ledger()
        self._jitter = random.Random()
        renew_locks_in_children(self)

    def renew_locks(self) -> None:
        """In a forked child: the parent's sampler thread may have held the tick lock."""
        self._tick_lock = threading.Lock()
        self.thread.renew_locks()

    @property
    def uses_sigprof(self) -> bool:
        """Whether a main-thread loop may be ticked by ``SIGPROF`` (asked and available)."""
        return self.sigprof.enabled

    @property
    def timer_armed(self) -> bool:
        """Whether this process's SIGPROF timer is armed (for tests and diagnostics)."""
        return self.sigprof.timer_armed

    # -- registration (request threads) -------------------------------------------------

    def register_current(self, request: RequestProfile, cap: int = 1 << 30) -> bool:
        """Register ``request`` as running on this thread (its task, on an event loop).

        False (and nothing registered) when ``cap`` requests are registered there already.
        """
        where = self.registry.add_current(request, cap, self.sigprof.can_drive)
        if where is None:
            return False
        if type(where) is LoopState and where.driven:
            if not where.ticking or self.sigprof.armed_pid != PROCESS[0]:
                self.sigprof.drive(where)  # (steady state: ticking and armed, nothing to do)
        else:
            self.thread.wake()
        if self.pending_failures:
            self.count_failures()
        return True

    def unregister_current(self, request: RequestProfile) -> None:
        """Forget ``request`` (called when its profile finishes, on any thread).

        The time since the last tick is split: half goes to the state that tick saw
        (on average the state changed halfway), the rest is not attributed. Unless the
        tick saw the request's own thread inside the app's call, and the adapter said
        when that call returned (``left_app_at``, WSGI): then the time up to the return
        is that state's, as a worker job's end is its own, and the server's time after
        it (writing the response) is not attributed.
        """
        before = self.ledger.states.pop(request, None)
        if before is not None:
            last_tick = self.last_tick
            close_wait(request, before, last_tick)
            left_app = request.left_app_at
            if (
                left_app is not None
                and left_app > last_tick
                and type(before) is Running
                and not before.worker
            ):
                in_app = self._trailing(last_tick, until=left_app)
                if in_app:
                    add_time(request, before, in_app)
            else:
                trailing = self._trailing(last_tick)
                if trailing:
                    add_time(request, before, trailing / 2)
        registration = request.registration  # (a loop's state, or a WSGI thread's ident)
        self.registry.remove(request)
        if type(registration) is int and registration == threading.get_ident():
            self._tick_if_overdue()  # (as a worker job's end: its thread is no longer read)

    def register_worker(
        self, request: RequestProfile, submitted_from: list[str], stop: types.CodeType
    ) -> None:
        """This worker thread runs a job of ``request`` (frames above ``stop`` are its)."""
        self._tick_if_overdue()  # (before: this job is not registered yet)
        self.registry.threads[threading.get_ident()] = Job(
            request, submitted_from, stop, _clock.perf_counter()
        )
        if not driven(request):
            self.thread.wake()

    def unregister_worker(
        self, func: Callable[..., Any] | None = None, args: tuple[Any, ...] = ()
    ) -> None:
        """The job on this worker thread ended: its time since the last tick is its own.

        (A job's start and end are known exactly, unlike a state change between two ticks;
        crediting half the boundary intervals lost a quarter of a 10 ms job.) A job no tick
        saw gets its whole time under the stack that submitted it plus its function
        ``func`` (called with ``args``: see :func:`job_stack`): where inside it is unknown,
        but the time is the request's. A job the ticks saw while its request ran on a loop
        (which they credited instead) adds nothing.
        """
        self._end_job(func, args)
        self._tick_if_overdue()  # (after: this job is no longer registered)

    def _end_job(self, func: Callable[..., Any] | None, args: tuple[Any, ...]) -> None:
        # Not in the middle of a tick (on another thread: this one waits for it to end), or
        # that tick would credit the job's end a second time. A tick never waits for this.
        with self._tick_lock:
            job = self.registry.threads.pop(threading.get_ident(), None)
            if job is None:
                return
            state = self.ledger.job_states.pop(job, None)
            request = job.request
            if request.closed:
                return
            now = _clock.perf_counter()
            if state is not None:
                trailing = self._trailing(max(self.last_tick, job.began), until=now)
                if trailing:
                    add_time(request, state, trailing)
            elif func is not None and job.submitted_from is not None and not job.seen:
                request.add_worker(job_stack(job.submitted_from, func, args), now - job.began)
            if job.submitted_from is not None:
                self.ledger.jobs_ended(request, job.began, now)

    def _tick_if_overdue(self) -> None:
        """Tick now, from this thread, if no tick came for a while (a worker job starting
        or ending, a WSGI request ending: on a thread that holds the GIL, and is not
        registered itself at that moment).

        Two threads running Python code hand the GIL to each other every switch
        interval, and a third that asks for it meanwhile (the loop thread that runs the
        ``SIGPROF`` handler, the sampler thread) can wait until one of them stops: 30 to
        50 ms. Every job on a worker thread that started and ended inside such a wait was
        unseen: its time only under its function, none under the frames inside it. A
        thread that holds the GIL anyway at a job's start or end ticks for the others.
        """
        if _clock.perf_counter() - self.last_tick > _OVERDUE * self.interval:
            # As the sampler thread's tick after a nap of one interval and a long wait
            # for the GIL: that wait is credited only up to a cap (see ``_sample``).
            self.tick(None, self.interval)

    def _trailing(self, since: float, *, until: float | None = None) -> float:
        """Seconds from ``since`` (at or after the last tick) to ``until`` (default: now);
        0 when that is no plausible tail of an interval (a clock oddity, or ticks long
        stopped)."""
        trailing = (_clock.perf_counter() if until is None else until) - since
        return trailing if 0 < trailing < 10 * self.interval else 0.0

    # -- for the drivers -------------------------------------------------------------------

    def next_interval(self) -> float:
        """Seconds to the next tick, jittered between 0.5x and 1.5x the interval, and
        not before the ticks' CPU budget allows (:attr:`min_gap`)."""
        # A CPU-bound thread hands the GIL over on a fixed 5 ms beat; a fixed sleep
        # phase-locks the ticks to the work and biases what they see.
        jittered = self.interval * (0.5 + self._jitter.random())
        return jittered if jittered >= self.min_gap else self.min_gap

    def held_back(self) -> float:
        """Seconds until the ticks' CPU budget allows the next tick (0.0: now)."""
        wait = self.min_gap - (_clock.perf_counter() - self.last_tick)
        return wait if wait > 0.0 else 0.0

    def count_failures(self) -> None:
        """Move failed ticks into the counters (not from a signal handler: it takes a lock)."""
        if self.pending_failures:
            failures, self.pending_failures = self.pending_failures, 0
            count("failed.sample", failures)

    def stop(self, timeout: float = 2.0) -> bool:
        """Stop the sampler thread and the SIGPROF timer (at exit; tests). False when the
        thread still runs after ``timeout`` seconds."""
        self.sigprof.disarm()
        return self.thread.stop(timeout)

    # -- one tick ----------------------------------------------------------------------

    def tick(self, main_frame: types.FrameType | None, slept: float | None) -> None:
        """Credit the time since the last tick; ``main_frame``: the interrupted frame.

        ``slept``: how long the sampler thread slept (the rest of the interval it waited
        for the GIL); None for SIGPROF and loop ticks, which wait for nothing.
        """
        if not self._tick_lock.acquire(blocking=False):
            return  # another tick is running (a signal arrived during a loop tick)
        try:
            now = _clock.perf_counter()
            elapsed = now - self.last_tick
            if elapsed < self.min_gap:
                return  # over the CPU budget: the next tick credits this time too
            self.last_tick = now
            if slept is None or slept > elapsed:
                slept = elapsed
            began = time.thread_time()
            self._sample(elapsed, slept, main_frame)
            # A tick walks the stack of every request registered: with many requests
            # deep in a framework and a database driver at once (40 worker threads 100+
            # frames deep: about 1 ms a tick) ticks every 5 ms took a quarter of a core.
            # Their CPU time is held to _TICK_BUDGET by spacing them out: fewer samples
            # under such load, never more cost.
            cost = time.thread_time() - began
            # One tick's cost counts at most a few times the smoothed cost: a full garbage
            # collection its allocations happened to set off (25-30 ms in a FastAPI server)
            # is not what ticks cost, and counted whole it spaced the ticks 300 ms apart
            # for a second or more, so whole batches of requests went unseen. A real rise
            # (more requests registered) still comes through within a few ticks.
            ceiling = _TICK_OUTLIER * self.tick_cpu + self.interval * _TICK_BUDGET
            self.tick_cpu += (
                (cost if cost < ceiling else ceiling) - self.tick_cpu
            ) * _TICK_SMOOTHING
            self.min_gap = self.tick_cpu / _TICK_BUDGET
        except Exception as exc:
            if raised_by_signal_handler(exc):
                raise  # the app's own signal handler ran in the tick: its exception
            self.pending_failures += 1
        finally:
            self._tick_lock.release()

    def _sample(
        self, elapsed: float, slept: float, main_frame: types.FrameType | None = None
    ) -> None:
        """One tick: find each registered request's state now and credit the interval.

        ``elapsed - slept`` is how long the sampler waited for the GIL after its sleep:
        a thread held it and ran on. When a request's state changed since the last
        tick, that wait is credited to its previous state (what was running), the sleep
        is split evenly between the two, so neither boundary is biased.

        A request still waiting on the same future as at the last tick costs one
        identity check: its wait is credited in one piece when it ends (``Ledger``).
        """
        frames = sys._current_frames()
        main_ident = self.sigprof.main_ident
        if main_frame is not None:  # SIGPROF: the main thread is in the handler now
            # The signal may have interrupted our own registration code: its time goes to
            # the first caller outside the sampler, as a thread tick's does.
            frames[main_ident] = _outside_sampler(main_frame)  # type: ignore[index]
        running, jobs = self.registry.running_now(frames, main_ident, main_frame, _outside_sampler)
        del frames  # frame objects of other threads: hold them no longer than needed
        # A long wait for the GIL (threads contending) is not credited beyond a cap: the
        # sampler wins the GIL when a thread *releases* it, typically in I/O right after
        # its CPU work, so crediting the whole wait to what it then sees put a request's
        # 30 ms of work under gunicorn's socket write. Unseen time stays unattributed.
        gil_wait = min(max(0.0, elapsed - slept), _GIL_WAIT_CAP * self.interval)
        interval = Interval(self.last_tick, elapsed, slept, gil_wait)
        self.ledger.credit_tick(list(self.registry.loops.values()), running, jobs, interval)
        self.samples += 1
        if not self.samples % _SWEEP_TICKS:
            self.ledger.sweep()


_SAMPLER_FILES = frozenset(
    module.__file__
    for module in (sys.modules[__name__], _ledger, _registry, _sigprof, _stacks, _thread)
)


def _outside_sampler(frame: types.FrameType) -> types.FrameType:
    """``frame``, or its first caller outside the sampler's modules (never its frames)."""
    current: types.FrameType | None = frame
    while current is not None and current.f_code.co_filename in _SAMPLER_FILES:
        current = current.f_back
    return current if current is not None else frame


_GIL_WAIT_CAP = 2  # most GIL wait credited per tick, in intervals
_TICK_BUDGET = 0.02  # most of one CPU the ticks may use (their own CPU time)
_TICK_SMOOTHING = 0.25  # weight of the last tick in the smoothed tick cost
# Intervals without a tick after which a worker job's start or end, or a WSGI request's
# end, ticks (``_tick_if_overdue``).
_OVERDUE = 2
# Most a tick's cost counts: this many smoothed tick costs, plus the cost at which ticks
# fill the budget at the interval (0.1 ms at 5 ms: never held back by one outlier alone).
_TICK_OUTLIER = 4
_SWEEP_TICKS = 256  # ticks between sweeps of states left by requests gone mid-tick


_sampler: AlwaysOnSampler | None = None
_sampler_lock = threading.Lock()


def always_on_sampler(interval: float, *, sigprof: bool = True) -> AlwaysOnSampler:
    """The process's sampler (created on first use, with the first caller's settings).

    A process has one: the signal, the timer and the sampler thread are the process's.
    The first middleware to use it sets its interval and ``SIGPROF`` use; a later one
    with other settings gets a warning naming both (see :func:`check_settings`) and the
    sampler in force.
    """
    global _sampler
    if _sampler is None:
        with _sampler_lock:
            if _sampler is None:
                _sampler = AlwaysOnSampler(interval, sigprof=sigprof)
                atexit.register(_sampler.stop)
                return _sampler
    check_settings(interval, sigprof=sigprof)
    return _sampler


def current_sampler() -> AlwaysOnSampler | None:
    """The process's sampler, or None before any always-on request (diagnostics)."""
    return _sampler


_conflicts_logged: set[tuple[float, bool, float, bool]] = set()


def check_settings(interval: float, *, sigprof: bool) -> None:
    """Warn (once per pair) when ``interval``/``sigprof`` differ from the process's sampler.

    Two middlewares in one process (a mounted sub-app, say) cannot have two always-on
    samplers: the first one's settings are in force, and profiles record the interval
    actually used. Nothing to check before the sampler exists.
    """
    sampler = _sampler
    if sampler is None:
        return
    wanted = (interval, sigprof and hasattr(signal, "setitimer"))
    in_force = (sampler.interval, sampler.uses_sigprof)
    if wanted == in_force or (*in_force, *wanted) in _conflicts_logged:
        return
    _conflicts_logged.add((*in_force, *wanted))
    _logger.warning(
        "otelprof: two middlewares in this process ask for different always-on settings: "
        "always_on_interval_ms=%g, always_on_sigprof=%s is in force (the first one's); "
        "always_on_interval_ms=%g, always_on_sigprof=%s is ignored. A process has one "
        "always-on sampler: give every middleware the same settings.",
        in_force[0] * 1000.0,
        in_force[1],
        wanted[0] * 1000.0,
        wanted[1],
    )


def reset_for_tests() -> None:
    """Stop and forget the process's sampler and disarm its timers (tests only)."""
    global _sampler
    with _sampler_lock:
        sampler, _sampler = _sampler, None
    if sampler is not None:
        sampler.stop()
    disarm_all()
    _conflicts_logged.clear()
