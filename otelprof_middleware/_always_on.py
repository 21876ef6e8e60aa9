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
import os
import random
import signal
import sys
import threading
import time
import types
from collections.abc import Callable, Coroutine
from typing import Any

from pyinstrument.frame import AWAIT_FRAME_IDENTIFIER

from ._failsafe import count
from ._frames import ON_CLEAR, frame_identifier, frame_stack
from ._session import RequestProfile, current_request

__all__ = ["AlwaysOnSampler", "always_on_sampler"]


def _thread_identifier(ident: int) -> str:
    thread = threading._active.get(ident)  # type: ignore[attr-defined]
    name = thread.name if thread is not None else "Thread"
    return f"{name}\x00<thread>\x00{ident}"


def _stack(
    ident: int, frame: types.FrameType | None, stop: types.CodeType | None = None
) -> list[str]:
    """Root-first frame identifiers of ``frame``'s chain, stopping below ``stop``'s frame."""
    stack = frame_stack(frame, stop)
    stack.append(_thread_identifier(ident))
    stack.reverse()
    return stack


_AWAIT_STACKS: dict[tuple[int, ...], list[str]] = {}
_MAX_AWAIT_STACKS = 4096
# Keys hold code ids: every code in a key went through frame_identifier, whose cache
# keeps it alive, and this cache is emptied whenever that one is.
ON_CLEAR.append(_AWAIT_STACKS.clear)


def _await_chain(coro: object) -> list[Any]:
    """A suspended coroutine and what it awaits, outermost first.

    Only real coroutines and generators are followed (``cr_await``/``gi_yieldfrom``),
    so no user-defined attribute lookup ever runs on the sampler thread.
    """
    chain: list[Any] = []
    while len(chain) < 200:
        kind = type(coro)
        if kind is types.CoroutineType:
            chain.append(coro)
            coro = coro.cr_await  # type: ignore[attr-defined]
        elif kind is types.GeneratorType:
            chain.append(coro)
            coro = coro.gi_yieldfrom  # type: ignore[attr-defined]
        else:
            break
    return chain


def _await_stack(prefix: list[str], coro: object) -> list[str]:
    """Where a suspended task waits: ``prefix``, its coroutine chain, then ``[await]``.

    Concurrent requests mostly wait at the same few places, so the stack is cached by the
    chain's code objects and the innermost one's instruction offset: reading those needs
    no frame object, and naming frames costs far more. (An outer function that awaits the
    same function from two lines shares one entry: only its line attribute may be off.)
    """
    chain = _await_chain(coro)
    key = [id(prefix), *(id(_code_of(node)) for node in chain)]
    innermost = _frame_of(chain[-1]) if chain else None
    key.append(innermost.f_lasti if innermost is not None else -1)
    cache_key = tuple(key)
    stack = _AWAIT_STACKS.get(cache_key)
    if stack is None:
        stack = list(prefix)
        for node in chain:
            frame = _frame_of(node)
            if frame is None:
                break
            stack.append(frame_identifier(frame))
        stack.append(AWAIT_FRAME_IDENTIFIER)
        if len(_AWAIT_STACKS) >= _MAX_AWAIT_STACKS:
            _AWAIT_STACKS.clear()
        _AWAIT_STACKS[cache_key] = stack
    return stack


def _code_of(node: Any) -> types.CodeType:
    """The code of a coroutine or generator from :func:`_await_chain`."""
    code: types.CodeType = node.cr_code if type(node) is types.CoroutineType else node.gi_code
    return code


def _frame_of(node: Any) -> types.FrameType | None:
    """The frame of a coroutine or generator from :func:`_await_chain` (None: finished)."""
    frame: types.FrameType | None = (
        node.cr_frame if type(node) is types.CoroutineType else node.gi_frame
    )
    return frame


class _Wait:
    """Where a request's task waited at the last tick: the future and the stack."""

    __slots__ = ("future", "state")

    def __init__(self, future: object, state: _State) -> None:
        self.future = future
        self.state = state


class _LoopState:
    __slots__ = ("driven", "idle_ticks", "loop", "prefix", "requests", "ticking")

    def __init__(self, loop: asyncio.AbstractEventLoop, driven: bool) -> None:
        self.loop = loop
        self.prefix: list[str] | None = None  # the loop's frames below a task's coroutine
        self.requests: dict[RequestProfile, asyncio.Task[Any]] = {}  # request -> its task
        self.driven = driven  # ticked by SIGPROF and its own call_later, not the thread
        self.ticking = False
        self.idle_ticks = 0  # loop ticks in a row that found no request


_Job = tuple[RequestProfile, list[str] | None, types.CodeType | None]


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
        self._previous: dict[RequestProfile, _State] = {}  # written by ticks only
        self._last_tick = time.perf_counter()
        self._waits: dict[RequestProfile, _Wait] = {}  # ticks only
        self._jitter = random.Random()
        self._handler_installed = False
        self._armed_pid = -1  # the process whose SIGPROF timer is armed
        self._main_ident = threading.main_thread().ident

    # -- registration (request threads) -------------------------------------------------

    def register_current(self, request: RequestProfile) -> None:
        """Register ``request`` as running on this thread (its task, on an event loop)."""
        ident = threading.get_ident()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._threads[ident] = (request, None, None)
            request.registration = (ident, None)
            self._wake_thread()
        else:
            state = self._loops.get(ident)
            if state is None or state.loop is not loop:
                state = self._loops[ident] = _LoopState(loop, self._can_drive(ident))
                if not state.driven:  # SIGPROF ticks read the running task's context
                    self._install_task_factory(loop)
            task = asyncio.current_task(loop)
            if task is not None:
                self._tasks[task] = request
                state.requests[request] = task
                request.registration = (ident, state)
            if state.driven:
                if not state.ticking or self._armed_pid != _PROCESS[0]:
                    self._drive(state)  # (steady state: ticking and armed, nothing to do)
            else:
                self._wake_thread()
        self._count_failures()

    def unregister_current(self, request: RequestProfile) -> None:
        """Forget ``request`` (called when its profile finishes, on any thread).

        The time since the last tick is split: half goes to the state that tick saw
        (on average the state changed halfway), the rest is not attributed.
        """
        before = self._previous.get(request)
        if before is not None:
            trailing = time.perf_counter() - self._last_tick
            if 0 < trailing < 10 * self.interval:
                _add(request, before, trailing / 2)
        registration, request.registration = request.registration, None
        if registration is None:
            return
        ident, state = registration
        if isinstance(state, _LoopState):
            task = state.requests.pop(request, None)
            if task is not None:
                self._tasks.pop(task, None)
        else:
            job = self._threads.get(ident)
            if job is not None and job[0] is request:
                self._threads.pop(ident, None)

    def register_worker(
        self, request: RequestProfile, submitted_from: list[str], stop: types.CodeType
    ) -> None:
        """This worker thread runs a job of ``request`` (frames above ``stop`` are its)."""
        self._threads[threading.get_ident()] = (request, submitted_from, stop)
        if not _driven(request):
            self._wake_thread()

    def unregister_worker(self) -> None:
        """The job on this worker thread ended."""
        self._threads.pop(threading.get_ident(), None)

    def _install_task_factory(self, loop: asyncio.AbstractEventLoop) -> None:
        previous = loop.get_task_factory()
        if getattr(previous, "otelprof_factory", False):
            return  # ours already (a loop's id may be reused by a later loop: not a key)
        tasks = self._tasks
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

        factory.otelprof_factory = True  # type: ignore[attr-defined]
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
        return True

    def _drive(self, state: _LoopState) -> None:
        if self._armed_pid != _pid():
            self._arm()
        if not state.ticking:
            self._wake_thread()  # the watchdog
            state.ticking = True
            state.loop.call_later(self._next_interval(), self._loop_tick, state, context=_EMPTY)

    def _next_interval(self) -> float:
        # Jitter: a CPU-bound thread hands the GIL over on a fixed 5 ms beat; a fixed
        # sleep phase-locks the ticks to the work and biases what they see.
        return self.interval * (0.5 + self._jitter.random())

    def _arm(self) -> None:
        """Arm the periodic SIGPROF timer; it is disarmed when nothing is registered.

        Periodic, not one-shot: re-arming from the handler costs a kernel tick each
        time (a 5 ms one-shot fired every 12 ms here), and the kernel quantizes any
        jitter away. An armed timer also survives ``exec``, which would kill the new
        program: that is why it never stays armed while the process is idle.
        """
        try:
            signal.setitimer(signal.ITIMER_PROF, self.interval, self.interval)
            self._armed_pid = _pid()
        except (ValueError, OSError):
            self._armed_pid = -1

    def _disarm(self) -> None:
        if self._armed_pid == _pid():
            self._armed_pid = -1
            with contextlib.suppress(ValueError, OSError):
                signal.setitimer(signal.ITIMER_PROF, 0)

    def _on_sigprof(self, signum: int, frame: types.FrameType | None) -> None:
        # Runs on the main thread between two bytecodes of whatever it was running:
        # never raise, never block, take no lock that code might hold.
        try:
            if self._tasks or self._threads:
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
                with contextlib.suppress(ValueError, OSError):
                    if signal.getitimer(signal.ITIMER_PROF)[1] == self.interval:
                        signal.setitimer(signal.ITIMER_PROF, 0)  # ours: not into theirs
                self._armed_pid = -1
                self._install_task_factory(state.loop)
                state.ticking = False
                self._wake_thread()
                return
            # (skipped when a SIGPROF tick was recent: a busy loop gets those)
            if state.requests and time.perf_counter() - self._last_tick >= 0.75 * self.interval:
                self._tick(None, None)
            if self._armed_pid != _pid() or signal.getitimer(signal.ITIMER_PROF)[0] == 0:
                self._arm()  # (other code may have set the timer to zero)
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
        """
        frames = sys._current_frames()
        if main_frame is not None:  # SIGPROF: the main thread is in the handler now
            frames[self._main_ident] = main_frame  # type: ignore[index]
        now_states: dict[RequestProfile, _State] = {}
        for ident, state in list(self._loops.items()):
            task = asyncio.current_task(state.loop)
            frame = frames.get(ident)
            if task is None or frame is None:
                continue
            if ident != self._main_ident:
                request = self._tasks.get(task)
            elif main_frame is None:
                frame = _outside_sampler(frame)  # a thread tick may catch the handler
                request = self._tasks.get(task)
            else:
                # The handler runs in the interrupted task's context: its request is
                # current, child tasks included (they copied the context).
                request = current_request.get()
                if request is not None and not request.continuous:
                    request = None  # a hook-mode request: its hook profiles it
            root = getattr(task.get_coro(), "cr_frame", None)
            stack, below_root = _running_stack(ident, frame, root)
            if below_root:
                prefix = stack[:below_root]
                if prefix != state.prefix:  # kept as one object while it is the same:
                    state.prefix = prefix  # await stacks are cached by its identity
                    _AWAIT_STACKS.clear()
            if request is not None and not request.closed:
                now_states[request] = (stack, _RUNNING)
        for ident, (request, submitted_from, stop_code) in list(self._threads.items()):
            frame = frames.get(ident)
            if frame is None or request.closed:
                continue
            if submitted_from is None:
                now_states[request] = (_stack(ident, frame), _RUNNING)
            else:  # frames above the job wrapper, under the stack that submitted it
                tail = _stack(ident, frame, stop_code)[1:]
                now_states[request] = (submitted_from + tail, _WORKER)
        del frames  # frame objects of other threads: hold them no longer than needed
        previous = self._previous
        waits = self._waits
        unchanged: list[RequestProfile] = []
        for state in list(self._loops.values()):
            for request, task in list(state.requests.items()):
                if request in now_states or request.closed:
                    continue
                # A suspended task waits on one future until it runs again; the same
                # future as last tick means the same await stack (the common case: a
                # request waiting on I/O costs one identity check per tick).
                future = getattr(task, "_fut_waiter", None)
                wait = waits.get(request)
                if (
                    future is not None
                    and wait is not None
                    and wait.future is future
                    and previous.get(request) is wait.state
                ):
                    now_states[request] = wait.state
                    unchanged.append(request)
                    continue
                if task.done():
                    continue
                wait = waits[request] = _Wait(
                    future, (_await_stack(state.prefix or [], task.get_coro()), _WAITING)
                )
                now_states[request] = wait.state
        # A long wait for the GIL (threads contending) is not credited beyond a cap: the
        # sampler wins the GIL when a thread *releases* it, typically in I/O right after
        # its CPU work, so crediting the whole wait to what it then sees put a request's
        # 30 ms of work under gunicorn's socket write. Unseen time stays unattributed.
        gil_wait = min(max(0.0, elapsed - slept), _GIL_WAIT_CAP * self.interval)
        for request in unchanged:
            request.add_wait(now_states[request][0], elapsed)
        for request, now in now_states.items():
            before = previous.get(request)
            if before is now:
                continue  # an unchanged wait, credited above
            _credit(request, before, now, elapsed, slept, gil_wait)
        for request, before in previous.items():
            if request not in now_states and not request.closed:
                _credit(request, before, None, elapsed, slept, gil_wait)
        self._previous = now_states
        if len(waits) > len(now_states):
            for gone in [r for r in waits if r not in now_states]:
                del waits[gone]
        self.samples += 1


_RUNNING, _WORKER, _WAITING = 0, 1, 2
_State = tuple[list[str], int]


def _credit(
    request: RequestProfile,
    before: _State | None,
    now: _State | None,
    elapsed: float,
    slept: float,
    gil_wait: float,
) -> None:
    if now is not None and before is not None and now == before:
        _add(request, now, elapsed)
        return
    if before is None:  # started during the interval
        if now is not None:
            # The GIL wait was spent running (by whoever held it, most likely this
            # state); of the sleep, on average half. Never more than its age.
            age = time.perf_counter() - request.start_perf
            _add(request, now, min(age, elapsed, gil_wait + slept / 2))
        return
    if before[1] != _WAITING:  # the GIL wait was most likely spent running ``before``
        _add(request, before, slept / 2 + gil_wait)
        if now is not None:
            _add(request, now, slept / 2)
    else:  # a waiting request held no GIL: the wait went to what runs now
        _add(request, before, slept / 2)
        if now is not None:
            _add(request, now, slept / 2 + gil_wait)


def _add(request: RequestProfile, state: _State, seconds: float) -> None:
    stack, kind = state
    if kind == _RUNNING:
        request.add(stack, seconds)
    elif kind == _WAITING:  # the stack ends with [await] already
        request.add_wait(stack, seconds)
    else:
        request.add_worker(stack, seconds)


def _running_stack(
    ident: int, frame: types.FrameType, root: types.FrameType | None
) -> tuple[list[str], int]:
    """The loop thread's stack, root first, and how many entries lie below ``root``.

    ``root`` is the running task's outermost coroutine frame: what lies below it (the
    thread and the loop's own frames) is where the loop's waiting tasks hang too.
    """
    stack = _stack(ident, frame)
    if root is None:
        return stack, 0
    depth = 0  # frames from the root coroutine up to ``frame``
    current: types.FrameType | None = frame
    while current is not None:
        depth += 1
        if current is root:
            return stack, len(stack) - depth
        current = current.f_back
    return stack, 0


_EMPTY = contextvars.Context()  # loop ticks run outside every request
_THIS_FILE = __file__


def _outside_sampler(frame: types.FrameType) -> types.FrameType:
    """``frame``, or its first caller outside this module (never the sampler's frames)."""
    current: types.FrameType | None = frame
    while current is not None and current.f_code.co_filename == _THIS_FILE:
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


def _pid() -> int:
    return _PROCESS[0]


def _after_fork_in_child() -> None:
    _PROCESS[0] = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

_GIL_WAIT_CAP = 2  # most GIL wait credited per tick, in intervals
_LOOP_IDLE_TICKS = 20  # empty loop ticks before the loop tick stops and the timer is disarmed
_WATCHDOG_INTERVALS = 4  # the watchdog's sleep while the loop ticks, in intervals
_WATCHDOG_BUSY = 8  # its sleep while the loop thread was running on the CPU, in intervals
_WATCHDOG_IDLE_ROUNDS = 50  # rounds without requests before the watchdog idles


def _driven(request: RequestProfile) -> bool:
    """Whether ``request`` is registered on a loop that SIGPROF ticks."""
    registration = request.registration
    return (
        registration is not None
        and isinstance(registration[1], _LoopState)
        and (registration[1].driven)
    )


def _forget(tasks: dict[asyncio.Task[Any], RequestProfile]) -> Callable[[Any], None]:
    def forget(task: Any) -> None:
        tasks.pop(task, None)

    return forget


_sampler: AlwaysOnSampler | None = None
_sampler_lock = threading.Lock()


def always_on_sampler(interval: float, *, sigprof: bool = True) -> AlwaysOnSampler:
    """The process's sampler (created on first use, with the first caller's settings)."""
    global _sampler
    if _sampler is None:
        with _sampler_lock:
            if _sampler is None:
                _sampler = AlwaysOnSampler(interval, sigprof=sigprof)
                atexit.register(_sampler.stop)
    return _sampler
