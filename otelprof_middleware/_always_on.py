"""Always-on mode: a sampler per process, samples attributed per request.

pyinstrument's hook runs on every Python call, so a profiled call-heavy request runs
several times slower. Reading the threads' frames (``sys._current_frames()``) every
``interval`` costs time per sample instead (see docs/always-on.md). What
Pyroscope-style samplers lose, and this keeps, is *which request* each sample belongs
to:

* **event loop threads**: the asyncio task running at that moment
  (``asyncio.current_task(loop)``) is mapped to its request. A request's own task is
  registered when it starts; the tasks it creates are registered by a task factory on
  the loop, which looks at the creating context.
* **worker threads** (``def`` endpoints, ``run_in_threadpool``, executors): the job
  wrapper in ``_threads`` registers the thread for the job's duration, with the stack
  that submitted it; the worker's frames are grafted under that stack.
* **WSGI threads**: the request's thread is registered until the body's ``close()``.

A registered request that is not running anywhere at a tick is waiting: the tick goes
to its ``[await]`` under the coroutine chain its task is suspended in.

What drives the ticks:

* **An event loop on the main thread** (uvicorn, gunicorn's uvicorn workers, hypercorn):
  ``SIGPROF`` from a periodic ``ITIMER_PROF`` timer (process CPU time), whose Python
  handler runs on the loop thread itself, in the interrupted task, plus a ``call_later``
  tick on the loop for the time the process is idle (requests waiting), plus a watchdog
  thread for a loop blocked in a call that releases the GIL. No second thread competes
  for the GIL while the loop runs. A sampler *thread* does not work here: under
  load the loop releases and retakes the GIL at every poll, and a thread waiting for it
  wakes, fails and sleeps again (hundreds of context switches a second, few samples).
* **Anything else** (WSGI threads, a loop on another thread): one sampler thread. It
  needs the GIL to run: a thread that never releases it hands it over only every
  ``sys.getswitchinterval()`` (5 ms by default), which caps the effective rate for
  CPU-bound code at about 200 samples per second.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import logging
import os
import random
import signal
import sys
import threading
import time
import types
from collections.abc import Callable, Coroutine
from typing import Any

from . import _always_on_ledger, _always_on_stacks
from ._always_on_ledger import Interval, Running, State, Waiting, add_time, close_wait, credit
from ._always_on_stacks import AWAIT_STACKS, await_stack, running_stack, thread_stack
from ._cpu_timer import CPUTimer, disarm_all
from ._failsafe import count
from ._session import RequestProfile, current_request

__all__ = ["AlwaysOnSampler", "always_on_sampler", "check_settings", "reset_for_tests"]

_logger = logging.getLogger("otelprof_middleware")


class _LoopState:
    __slots__ = ("driven", "idle_ticks", "loop", "prefix", "requests", "ticking")

    def __init__(self, loop: asyncio.AbstractEventLoop, driven: bool) -> None:
        self.loop = loop
        self.prefix: list[str] | None = None  # the loop's frames below a task's coroutine
        self.requests: dict[RequestProfile, asyncio.Task[Any]] = {}  # request -> its task
        self.driven = driven  # ticked by SIGPROF and its own call_later, not the thread
        self.ticking = False
        self.idle_ticks = 0  # loop ticks in a row that found no request


# (request, stack that submitted the job or None, the job wrapper's code, when it began)
_Job = tuple[RequestProfile, list[str] | None, types.CodeType | None, float]


class AlwaysOnSampler:
    """The process's sampler: the registry of what runs where, and what ticks it.

    Registration calls come from the threads serving requests; ticks come from the
    sampler thread, the ``SIGPROF`` handler or a loop's ``call_later``, one at a time
    (a tick that finds another running is skipped). Plain dict operations are atomic
    under the GIL; ticks iterate over copies.

    Args:
        interval: seconds between ticks (jittered between 0.5x and 1.5x).
        sigprof: drive a main-thread event loop with ``SIGPROF`` (when that signal is
            free); False: always the sampler thread.
    """

    def __init__(self, interval: float, *, sigprof: bool = True) -> None:
        self.interval = interval
        self.sigprof = sigprof and hasattr(signal, "setitimer")
        self._cpu_timer = CPUTimer()
        self._loops: dict[int, _LoopState] = {}  # loop thread ident -> state
        self._tasks: dict[asyncio.Task[Any], RequestProfile] = {}
        self._threads: dict[int, _Job] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = -1
        self._lock = threading.Lock()
        self._tick_lock = threading.Lock()
        self.samples = 0
        self._failures = 0  # failed ticks not yet counted (a signal handler takes no locks)
        self._states: dict[RequestProfile, State] = {}  # each one's state at the last tick
        self._running_before: list[RequestProfile] = []  # running at the last tick
        self._last_tick = time.perf_counter()
        self._jitter = random.Random()
        self._handler_installed = False
        self._armed_pid = -1  # the process whose SIGPROF timer is armed
        self._main_ident = threading.main_thread().ident

    # -- registration (request threads) -------------------------------------------------

    def register_current(self, request: RequestProfile, cap: int = 1 << 30) -> bool:
        """Register ``request`` as running on this thread (its task, on an event loop).

        False (and nothing registered) when ``cap`` requests are registered there already.
        """
        ident = threading.get_ident()
        loop = asyncio._get_running_loop()
        if loop is None:
            threads = self._threads
            if len(threads) >= cap:
                return False
            threads[ident] = (request, None, None, request.start_perf)
            request.registration = ident
            self._wake_thread()
            return True
        state = self._loops.get(ident)
        if state is None or state.loop is not loop:
            state = self._loops[ident] = _LoopState(loop, self._can_drive(ident))
            if not state.driven:  # SIGPROF ticks read the running task's context
                self._install_task_factory(loop)
        requests = state.requests
        if len(requests) >= cap:
            return False
        task = asyncio.current_task(loop)
        if task is not None:
            requests[request] = task
            request.registration = state
            if not state.driven:  # (SIGPROF ticks find the request in the context)
                self._tasks[task] = request
        if state.driven:
            if not state.ticking or self._armed_pid != _PROCESS[0]:
                self._drive(state)  # (steady state: ticking and armed, nothing to do)
        else:
            self._wake_thread()
        if self._failures:
            self._count_failures()
        return True

    def unregister_current(self, request: RequestProfile) -> None:
        """Forget ``request`` (called when its profile finishes, on any thread).

        The time since the last tick is split: half goes to the state that tick saw
        (on average the state changed halfway), the rest is not attributed.
        """
        before = self._states.pop(request, None)
        if before is not None:
            last_tick = self._last_tick
            close_wait(request, before, last_tick)
            trailing = self._trailing(last_tick)
            if trailing:
                add_time(request, before, trailing / 2)
        registration = request.registration
        if registration is None:
            return
        request.registration = None
        if type(registration) is _LoopState:
            task = registration.requests.pop(request, None)
            if task is not None and not registration.driven:
                self._tasks.pop(task, None)
        else:
            job = self._threads.get(registration)  # type: ignore[call-overload]
            if job is not None and job[0] is request:
                self._threads.pop(registration, None)  # type: ignore[call-overload]

    def register_worker(
        self, request: RequestProfile, submitted_from: list[str], stop: types.CodeType
    ) -> None:
        """This worker thread runs a job of ``request`` (frames above ``stop`` are its)."""
        self._threads[threading.get_ident()] = (request, submitted_from, stop, time.perf_counter())
        if not _driven(request):
            self._wake_thread()

    def unregister_worker(self, job_identifier: Callable[[], str] | None = None) -> None:
        """The job on this worker thread ended: its time since the last tick is its own.

        (A job's start and end are known exactly, unlike a state change between two ticks;
        crediting half the boundary intervals lost a quarter of a 10 ms job.) A job no tick
        saw gets its whole time under the stack that submitted it plus
        ``job_identifier()`` (the job's function): where inside it is unknown, but the
        time is the request's.
        """
        # Not in the middle of a tick (on another thread: this one waits for it to end), or
        # that tick would credit the job's end a second time. A tick never waits for this.
        with self._tick_lock:
            job = self._threads.pop(threading.get_ident(), None)
            if job is None or job[0].closed:
                return
            request = job[0]
            state = self._states.get(request)
            if type(state) is Running and state.worker:
                trailing = self._trailing(max(self._last_tick, job[3]))
                if trailing:
                    add_time(request, state, trailing)
                self._states.pop(request, None)  # the next tick starts afresh from there
            elif job_identifier is not None and job[1] is not None:
                request.add_worker([*job[1], job_identifier()], time.perf_counter() - job[3])

    def _trailing(self, since: float) -> float:
        """Seconds from ``since`` (at or after the last tick) to now; 0 when that is no
        plausible tail of an interval (a clock oddity, or ticks long stopped)."""
        trailing = time.perf_counter() - since
        return trailing if 0 < trailing < 10 * self.interval else 0.0

    def _install_task_factory(self, loop: asyncio.AbstractEventLoop) -> None:
        previous = loop.get_task_factory()
        tasks = self._tasks
        # Marked as the hook's factory is (``_task_hook``), by this sampler's registry: a
        # factory of a sampler since replaced (``testing.reset``) fills a dict no one reads.
        kind = f"always_on:{id(tasks)}"
        if kind in getattr(previous, "otelprof_kinds", ()):
            return  # ours already (a loop's id may be reused by a later loop: not a key)
        forget = _forget(tasks)

        def factory(
            loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kwargs: Any
        ) -> asyncio.Future[Any]:
            if previous is not None:
                task = previous(loop, coro, **kwargs)
            else:
                task = asyncio.Task(coro, loop=loop, **kwargs)
            request = current_request.get()  # the creating context decides
            if request is not None and request.continuous and not request.closed:
                tasks[task] = request  # type: ignore[index]
                task.add_done_callback(forget)
            return task

        factory.otelprof_kinds = frozenset({kind, *getattr(previous, "otelprof_kinds", ())})  # type: ignore[attr-defined]
        loop.set_task_factory(factory)  # type: ignore[arg-type]

    # -- SIGPROF and the loop's own tick (an event loop on the main thread) --------------

    def _can_drive(self, ident: int) -> bool:
        """Whether this thread's loop can be ticked by SIGPROF (installing the handler)."""
        if not self.sigprof or ident != self._main_ident:
            return False
        if self._handler_installed:
            return signal.getsignal(signal.SIGPROF) == self._on_sigprof
        try:
            if signal.getsignal(signal.SIGPROF) not in (signal.SIG_DFL, None):
                return False  # another profiler owns SIGPROF: leave it alone
            signal.signal(signal.SIGPROF, self._on_sigprof)
            signal.siginterrupt(signal.SIGPROF, False)  # restart interrupted system calls
        except (ValueError, OSError):
            return False
        self._handler_installed = True
        _guard_sigprof_changes()
        return True

    def _drive(self, state: _LoopState) -> None:
        if self._armed_pid != _pid() or not self._cpu_timer.armed:
            self._arm()
        if not state.ticking:
            self._wake_thread()  # the watchdog
            state.ticking = True
            state.idle_ticks = 0  # (a restart after idling must not stop at its first tick)
            state.loop.call_later(self._next_interval(), self._loop_tick, state, context=_EMPTY)

    def _next_interval(self) -> float:
        # Jitter: a CPU-bound thread hands the GIL over on a fixed 5 ms beat; a fixed
        # sleep phase-locks the ticks to the work and biases what they see.
        return self.interval * (0.5 + self._jitter.random())

    def _arm(self) -> None:
        """Arm the periodic SIGPROF timer; it is disarmed when nothing is registered.

        Periodic, not one-shot: re-arming from the handler costs a kernel tick each
        time (a 5 ms one-shot fired every 12 ms here), and the kernel quantizes any
        jitter away. A POSIX timer (:class:`CPUTimer`) where there is one: ``exec``
        deletes it, and it is not the process's one ``ITIMER_PROF``.
        """
        if self._armed_pid not in (-1, _pid()):
            self._cpu_timer.forget()  # a forked child: the parent's timer is not ours
        try:
            self._cpu_timer.arm(self.interval)
            self._armed_pid = _pid()
        except (ValueError, OSError):
            self._armed_pid = -1

    @property
    def timer_armed(self) -> bool:
        """Whether this process's SIGPROF timer is armed (for tests and diagnostics)."""
        return self._armed_pid == _pid() and self._cpu_timer.armed

    def _disarm(self) -> None:
        if self._armed_pid == _pid():
            self._armed_pid = -1
            self._cpu_timer.disarm()

    def _on_sigprof(self, signum: int, frame: types.FrameType | None) -> None:
        # Runs on the main thread between two bytecodes of whatever it was running:
        # never raise, never block, take no lock that code might hold.
        try:
            if (
                self._threads
                or self._tasks
                or current_request.get() is not None
                or any(state.requests for state in list(self._loops.values()))  # all waiting
            ):
                self._tick(frame, None)
        except Exception:
            self._failures += 1

    def _loop_tick(self, state: _LoopState) -> None:
        """The loop's own tick: no task runs now, so it sees every request waiting."""
        try:
            if not state.driven:
                state.ticking = False
                return
            if state.requests:
                state.idle_ticks = 0
            else:
                # Short requests leave the loop without one for moments at a time: keep
                # ticking (and the timer armed) through those, stop once really idle.
                state.idle_ticks += 1
                if state.idle_ticks > _LOOP_IDLE_TICKS:
                    state.ticking = False
                    if not self._tasks and not self._threads:
                        self._disarm()  # no timer left armed while idle: it survives exec
                    return
            if signal.getsignal(signal.SIGPROF) != self._on_sigprof:
                state.driven = False  # someone replaced our handler: the thread takes over
                if not self._cpu_timer.survives_exec:
                    self._disarm()  # our own POSIX timer: theirs is untouched
                else:
                    with contextlib.suppress(ValueError, OSError):
                        if signal.getitimer(signal.ITIMER_PROF)[1] == self.interval:
                            signal.setitimer(signal.ITIMER_PROF, 0)  # ours: not into theirs
                self._armed_pid = -1
                self._install_task_factory(state.loop)
                for request, task in list(state.requests.items()):
                    self._tasks[task] = request  # the thread's ticks look tasks up here
                state.ticking = False
                self._wake_thread()
                return
            # (skipped when a SIGPROF tick was recent: a busy loop gets those)
            if state.requests and time.perf_counter() - self._last_tick >= 0.75 * self.interval:
                self._tick(None, None)
            if (
                self._armed_pid != _pid()
                or not self._cpu_timer.armed  # (disarmed by ``disarm_all``)
                or (self._cpu_timer.survives_exec and signal.getitimer(signal.ITIMER_PROF)[0] == 0)
            ):
                self._arm()  # (other code may have set the shared ITIMER_PROF to zero)
            state.loop.call_later(self._next_interval(), self._loop_tick, state, context=_EMPTY)
        except Exception:
            state.ticking = False
            self._failures += 1

    # -- the sampler thread ------------------------------------------------------------

    def _count_failures(self) -> None:
        """Move failed ticks into the counters (not from a signal handler: it takes a lock)."""
        if self._failures:
            failures, self._failures = self._failures, 0
            count("failed.sample", failures)

    def _wake_thread(self) -> None:
        self._ensure_thread()
        if not self._wake.is_set():
            self._wake.set()

    def _watching(self) -> bool:
        """Whether a SIGPROF-driven loop has requests (the thread watches for stalls)."""
        return any(state.driven and state.requests for state in list(self._loops.values()))

    def _needs_thread(self) -> bool:
        """Whether anything registered is not ticked by SIGPROF."""
        for state in list(self._loops.values()):
            if state.requests and not state.driven:
                return True
        return any(not _driven(job[0]) for job in list(self._threads.values()))

    def _ensure_thread(self) -> None:
        if self._pid == _pid() and self._thread is not None:
            return
        with self._lock:
            if self._pid == _pid() and self._thread is not None:
                return
            self._stop = threading.Event()
            self._wake = threading.Event()
            self._thread = threading.Thread(target=self._run, name="otelprof-sampler", daemon=True)
            self._thread.start()
            self._pid = _pid()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the sampler thread and the SIGPROF timer (at exit; tests)."""
        self._disarm()
        thread = self._thread
        if thread is None or self._pid != _pid():
            return
        self._stop.set()
        self._wake.set()
        thread.join(timeout)
        self._thread = None

    def _run(self) -> None:
        stop, wake = self._stop, self._wake
        stalled = False
        unwatched = 0  # watchdog rounds in a row that found no request to watch
        main_cpu = _main_thread_cpu_clock()
        last_cpu = last_wall = 0.0
        busy = False
        while not stop.is_set():
            sampling = self._needs_thread()
            if sampling or self._watching():
                unwatched = 0
            elif unwatched < _WATCHDOG_IDLE_ROUNDS:
                # Between two short requests there is often nothing registered for a
                # moment: stay (asleep) in watch mode rather than idle, so the next
                # request does not have to set the event and wake this thread.
                unwatched += 1
            else:
                # Clear, then look again: a registration between the two sets the
                # event again, so it is never missed for a whole wait.
                wake.clear()
                if not self._needs_thread() and not self._watching():
                    wake.wait(1.0)
                continue
            asked = self._next_interval()
            if sampling:
                time.sleep(asked)
                self._tick(None, asked)
            else:
                # Watchdog for SIGPROF-driven loops: a loop blocked in a call that
                # releases the GIL (time.sleep, a sync database driver) uses no CPU and
                # runs no loop tick, so nothing else would see it. Rarely awake while
                # the loop ticks (every wake-up must win the GIL from a busy loop).
                if stalled:
                    time.sleep(asked)
                else:  # every wake-up must win the GIL from the loop: fewer while it runs
                    time.sleep((_WATCHDOG_BUSY if busy else _WATCHDOG_INTERVALS) * self.interval)
                wall = time.perf_counter()
                cpu = _cpu_seconds(main_cpu)
                # Busy (its CPU clock ran for over half the time): SIGPROF ticks it,
                # however late the last tick looks. Blocked: the watchdog ticks.
                busy = cpu is not None and cpu - last_cpu > (wall - last_wall) / 2
                last_cpu, last_wall = cpu or 0.0, wall
                stalled = (
                    not busy and wall - self._last_tick > 2 * self.interval and self._watching()
                )
                if stalled:
                    self._tick(None, None)
            self._count_failures()

    # -- one tick ----------------------------------------------------------------------

    def _tick(self, main_frame: types.FrameType | None, slept: float | None) -> None:
        """Credit the time since the last tick; ``main_frame``: the interrupted frame.

        ``slept``: how long the sampler thread slept (the rest of the interval it waited
        for the GIL); None for SIGPROF and loop ticks, which wait for nothing.
        """
        if not self._tick_lock.acquire(blocking=False):
            return  # another tick is running (a signal arrived during a loop tick)
        try:
            now = time.perf_counter()
            elapsed = now - self._last_tick
            self._last_tick = now
            if slept is None or slept > elapsed:
                slept = elapsed
            self._sample(elapsed, slept, main_frame)
        except Exception:
            self._failures += 1
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
        identity check: its wait is credited in one piece when it ends.
        """
        frames = sys._current_frames()
        if main_frame is not None:  # SIGPROF: the main thread is in the handler now
            frames[self._main_ident] = main_frame  # type: ignore[index]
        running: dict[RequestProfile, State] = {}
        for ident, state in list(self._loops.items()):
            task = asyncio.current_task(state.loop)
            frame = frames.get(ident)
            if task is None or frame is None:
                continue
            if ident != self._main_ident:
                request = self._tasks.get(task)
            elif main_frame is None:
                frame = _outside_sampler(frame)  # a thread tick may catch the handler
                request = self._task_request(state, task)
            else:
                # The handler runs in the interrupted task's context: its request is
                # current, child tasks included (they copied the context).
                request = current_request.get()
                if request is not None and not request.continuous:
                    request = None  # a hook-mode request: its hook profiles it
            root = getattr(task.get_coro(), "cr_frame", None)
            stack, below_root = running_stack(ident, frame, root)
            if below_root:
                prefix = stack[:below_root]
                if prefix != state.prefix:  # kept as one object while it is the same:
                    state.prefix = prefix  # await stacks are cached by its identity
                    AWAIT_STACKS.clear()
            if request is not None and not request.closed:
                running[request] = Running(stack)
        interval_start = self._last_tick - elapsed
        job_starts: dict[RequestProfile, float] = {}
        for ident, (request, submitted_from, stop_code, began) in list(self._threads.items()):
            frame = frames.get(ident)
            if frame is None or request.closed:
                continue
            if submitted_from is None:
                running[request] = Running(thread_stack(ident, frame))
            else:  # frames above the job wrapper, under the stack that submitted it
                tail = thread_stack(ident, frame, stop_code)[1:]
                running[request] = Running(submitted_from + tail, worker=True)
                if began > interval_start:  # the job began during this interval
                    job_starts[request] = began
        del frames  # frame objects of other threads: hold them no longer than needed
        # A long wait for the GIL (threads contending) is not credited beyond a cap: the
        # sampler wins the GIL when a thread *releases* it, typically in I/O right after
        # its CPU work, so crediting the whole wait to what it then sees put a request's
        # 30 ms of work under gunicorn's socket write. Unseen time stays unattributed.
        gil_wait = min(max(0.0, elapsed - slept), _GIL_WAIT_CAP * self.interval)
        interval = Interval(self._last_tick, elapsed, slept, gil_wait)
        states = self._states
        for state in list(self._loops.values()):
            prefix = state.prefix or []
            for request, task in list(state.requests.items()):
                before = states.get(request)
                # A suspended task waits on one future until it runs again: the same
                # future as last tick means the same wait (the common case).
                future = getattr(task, "_fut_waiter", None)
                if type(before) is Waiting and before.future is future and future is not None:
                    continue
                if request in running or request.closed:
                    continue
                now: State | None = None
                if not task.done():
                    stack = await_stack(prefix, task.get_coro())
                    now = Waiting(future, stack, interval.end)
                self._change(request, before, now, interval)
        for request, now in running.items():
            job_began = job_starts.get(request) if job_starts else None
            self._change(request, states.get(request), now, interval, job_began)
        for request in self._running_before:
            # Ran at the last tick; neither running nor waiting on a loop now (its job
            # ended): its share of the interval, then forget it.
            if request not in running:
                before = states.get(request)
                if type(before) is Running:
                    self._change(request, before, None, interval)
        self._running_before = list(running)
        self.samples += 1
        if not self.samples % _SWEEP_TICKS:
            for request in [r for r in states if r.closed]:
                states.pop(request, None)  # (unregistered while a tick was running)

    def _task_request(self, state: _LoopState, task: asyncio.Task[Any]) -> RequestProfile | None:
        """The request whose task ``task`` is (a main-thread loop, ticked by a thread)."""
        request = self._tasks.get(task)
        if request is None and state.driven:  # driven loops do not fill ``_tasks``
            for candidate, its_task in list(state.requests.items()):
                if its_task is task:
                    return candidate
        return request

    def _change(
        self,
        request: RequestProfile,
        before: State | None,
        now: State | None,
        interval: Interval,
        job_began: float | None = None,
    ) -> None:
        """Credit ``request``'s interval to ``before`` and ``now``; ``now`` is its state.

        ``job_began``: ``now`` is a worker job that began at that moment of the interval,
        so the interval is split there rather than halfway.
        """
        close_wait(request, before, interval.end - interval.elapsed)
        if job_began is not None and now is not None:
            own = min(interval.elapsed, interval.end - job_began)
            if before is not None and interval.elapsed > own:
                add_time(request, before, interval.elapsed - own)
            add_time(request, now, own)
        else:
            credit(request, before, now, interval)
        if now is None or request.closed:  # (closed: its profile ended during this tick)
            self._states.pop(request, None)
        else:
            self._states[request] = now


_EMPTY = contextvars.Context()  # loop ticks run outside every request
_SAMPLER_FILES = frozenset({__file__, _always_on_ledger.__file__, _always_on_stacks.__file__})


def _outside_sampler(frame: types.FrameType) -> types.FrameType:
    """``frame``, or its first caller outside the sampler's modules (never its frames)."""
    current: types.FrameType | None = frame
    while current is not None and current.f_code.co_filename in _SAMPLER_FILES:
        current = current.f_back
    return current if current is not None else frame


def _main_thread_cpu_clock() -> int | None:
    """The main thread's CPU-time clock id, where the platform has one."""
    ident = threading.main_thread().ident
    try:
        return time.pthread_getcpuclockid(ident) if ident is not None else None
    except (AttributeError, OSError):
        return None


def _cpu_seconds(clock: int | None) -> float | None:
    if clock is None:
        return None
    try:
        return time.clock_gettime(clock)
    except OSError:
        return None


_PROCESS = [os.getpid()]  # this process's id, kept current across fork (no syscall)


_guarded = False


def _guard_sigprof_changes() -> None:
    """Disarm our timers before any ``signal.signal(SIGPROF, ...)`` that is not ours.

    Our SIGPROF comes from POSIX timers of our own; code that sets ``SIG_DFL`` (or its
    own handler) before the loop's next tick noticed would otherwise get a tick of ours,
    and SIGPROF's default action ends the process. (A C extension calling
    ``sigaction`` directly is not seen; the loop's tick still hands over within an
    interval.)
    """
    global _guarded
    if _guarded:
        return
    _guarded = True
    original = signal.signal

    def guarded_signal(signalnum: Any, handler: Any) -> Any:
        if signalnum == signal.SIGPROF and not isinstance(
            getattr(handler, "__self__", None), AlwaysOnSampler
        ):
            disarm_all()
        return original(signalnum, handler)

    signal.signal = guarded_signal


def _pid() -> int:
    return _PROCESS[0]


def _after_fork_in_child() -> None:
    _PROCESS[0] = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

_GIL_WAIT_CAP = 2  # most GIL wait credited per tick, in intervals
_SWEEP_TICKS = 256  # ticks between sweeps of states left by requests gone mid-tick
_LOOP_IDLE_TICKS = 20  # empty loop ticks before the loop tick stops and the timer is disarmed
_WATCHDOG_INTERVALS = 4  # the watchdog's sleep while the loop ticks, in intervals
_WATCHDOG_BUSY = 8  # its sleep while the loop thread was running on the CPU, in intervals
_WATCHDOG_IDLE_ROUNDS = 50  # rounds without requests before the watchdog idles


def _driven(request: RequestProfile) -> bool:
    """Whether ``request`` is registered on a loop that SIGPROF ticks."""
    registration = request.registration
    return type(registration) is _LoopState and registration.driven


def _forget(tasks: dict[asyncio.Task[Any], RequestProfile]) -> Callable[[Any], None]:
    def forget(task: Any) -> None:
        tasks.pop(task, None)

    return forget


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
    in_force = (sampler.interval, sampler.sigprof)
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
