"""Always-on: the registry of which request runs where, and who runs at a tick.

Registrations come from the threads serving requests; a tick reads the registry from
the sampler thread, the ``SIGPROF`` handler or a loop's ``call_later``. Plain dict
operations are atomic under the GIL, and ticks iterate over copies, so none of it
takes a lock.

* **event loops**, one :class:`LoopState` per loop thread: each registered request's
  own task. Tasks its task creates are found by the creating context: for a loop
  ticked by ``SIGPROF`` the handler runs in the interrupted task's context; for any
  other loop a task factory records them in :attr:`Registry.tasks`.
* **threads**, one :class:`Job` per thread: a WSGI request's thread, or a worker thread
  running a job a request submitted (``_worker_threads``).
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import types
from collections.abc import Callable
from typing import Any

from .._request_profile import RequestProfile, current_request
from .._task_factory import record_tasks
from ._ledger import Running, State
from ._stacks import AWAIT_STACKS, running_stack, thread_stack

__all__ = ["Job", "LoopState", "Registry", "current_task", "driven"]

current_task: Callable[[asyncio.AbstractEventLoop], asyncio.Task[Any] | None]
if sys.version_info >= (3, 12):
    current_task = asyncio.current_task  # in C
else:
    # 3.11's ``asyncio.current_task`` is a Python function reading this table (kept by
    # the C tasks): read it directly, a call less on every always-on request.
    current_task = asyncio.tasks._current_tasks.get  # type: ignore[attr-defined]


class LoopState:
    """One event loop's registered requests and how its ticks are driven."""

    __slots__ = ("driven", "idle_ticks", "loop", "prefix", "requests", "ticking")

    def __init__(self, loop: asyncio.AbstractEventLoop, driven: bool) -> None:
        self.loop = loop
        self.prefix: list[str] | None = None  # the loop's frames below a task's coroutine
        self.requests: dict[RequestProfile, asyncio.Task[Any]] = {}  # request -> its task
        self.driven = driven  # ticked by SIGPROF and its own call_later, not the thread
        self.ticking = False
        self.idle_ticks = 0  # loop ticks in a row that found no request


class Job:
    """What a registered thread runs: a request, or a job one submitted to a worker."""

    __slots__ = ("began", "request", "seen", "stop_code", "submitted_from")

    def __init__(
        self,
        request: RequestProfile,
        submitted_from: list[str] | None,
        stop_code: types.CodeType | None,
        began: float,
    ) -> None:
        self.request = request
        self.submitted_from = submitted_from  # None: the request's own thread (WSGI)
        self.stop_code = stop_code  # the job wrapper's code: frames above it are the job's
        self.began = began  # perf_counter() when it began
        self.seen = False  # a tick found it (its time is credited from the ticks on)


_THREAD_CPU_CLOCKS = hasattr(time, "pthread_getcpuclockid")  # (not on macOS, Windows)


class Registry:
    """Which request runs where: event loops' tasks and threads' jobs."""

    __slots__ = ("loops", "tasks", "threads")

    def __init__(self) -> None:
        self.loops: dict[int, LoopState] = {}  # loop thread ident -> state
        self.tasks: dict[asyncio.Task[Any], RequestProfile] = {}  # loops not SIGPROF-driven
        self.threads: dict[int, Job] = {}  # thread ident -> its job

    # -- registration (request threads) -------------------------------------------------

    def add_current(
        self, request: RequestProfile, cap: int, can_drive: Callable[[int], bool]
    ) -> LoopState | Job | None:
        """Register ``request`` as running on this thread (its task, on an event loop).

        Returns where it was registered, or None (nothing registered) when ``cap``
        requests are registered there already. ``can_drive(ident)``: whether a loop
        new to the registry on thread ``ident`` is ticked by ``SIGPROF``.
        """
        ident = threading.get_ident()
        loop = asyncio._get_running_loop()
        if loop is None:
            threads = self.threads
            if len(threads) >= cap:
                return None
            job = threads[ident] = Job(request, None, None, request.start_perf)
            request.registration = ident
            if _THREAD_CPU_CLOCKS:  # (the clock's id is read here, while the thread lives)
                try:
                    clock = time.pthread_getcpuclockid(ident)
                    request.thread_cpu = (clock, time.clock_gettime(clock))
                except OSError:  # (the ledger does without)
                    pass
            return job
        state = self.loops.get(ident)
        if state is None or state.loop is not loop:
            state = self.loops[ident] = LoopState(loop, can_drive(ident))
        if not state.driven:  # (SIGPROF ticks read the running task's context)
            self.install_task_factory(loop)  # each time: the app may have set its own since
        requests = state.requests
        if len(requests) >= cap:
            return None
        task = current_task(loop)
        if task is not None:
            requests[request] = task
            request.registration = state
            if not state.driven:  # (SIGPROF ticks find the request in the context)
                self.tasks[task] = request
            if state.prefix is None:  # (once a loop: its first request)
                note_prefix(state, ident, task)
        return state

    def remove(self, request: RequestProfile) -> None:
        """Forget where ``request`` is registered (its profile finished)."""
        registration = request.registration
        if registration is None:
            return
        request.registration = None
        if type(registration) is LoopState:
            task = registration.requests.pop(request, None)
            if task is not None and not registration.driven:
                self.tasks.pop(task, None)
        else:
            job = self.threads.get(registration)  # type: ignore[call-overload]
            if job is not None and job.request is request:
                self.threads.pop(registration, None)  # type: ignore[call-overload]

    def install_task_factory(self, loop: asyncio.AbstractEventLoop) -> None:
        """Record the tasks a registered request creates on ``loop`` (not SIGPROF-driven)."""
        record_tasks(loop, self.tasks)

    def stop_driving(self, state: LoopState) -> None:
        """``state``'s loop is no longer ticked by SIGPROF: the sampler thread looks its
        tasks up in :attr:`tasks` from now on."""
        state.driven = False
        self.install_task_factory(state.loop)
        for request, task in list(state.requests.items()):
            self.tasks[task] = request

    # -- questions (any thread) ----------------------------------------------------------

    def anything_registered(self) -> bool:
        """Whether any request is registered (the SIGPROF handler's first test)."""
        return bool(
            self.threads
            or self.tasks
            or current_request.get() is not None
            or any(state.requests for state in list(self.loops.values()))  # all waiting
        )

    def watching(self) -> bool:
        """Whether a SIGPROF-driven loop has requests (the thread watches for stalls)."""
        return any(state.driven and state.requests for state in list(self.loops.values()))

    def has_driven_loop(self) -> bool:
        """Whether a SIGPROF-driven event loop has registered requests in this process."""
        return any(state.driven for state in list(self.loops.values()))

    def needs_thread(self) -> bool:
        """Whether anything registered is not ticked by SIGPROF."""
        for state in list(self.loops.values()):
            if state.requests and not state.driven:
                return True
        return any(not driven(job.request) for job in list(self.threads.values()))

    # -- at a tick -------------------------------------------------------------------------

    def running_now(
        self,
        frames: dict[int, types.FrameType],
        main_ident: int | None,
        main_frame: types.FrameType | None,
        outside_sampler: Callable[[types.FrameType], types.FrameType],
    ) -> tuple[dict[RequestProfile, State], dict[Job, State]]:
        """Each request running at this tick on its own task or thread, with its stack,
        and each worker job running for a request (one request may have several at once,
        and run on its event loop meanwhile: each place is a state of its own).

        ``frames``: every thread's current frame; ``main_frame``: the frame SIGPROF
        interrupted (None for a thread or loop tick, whose own frames
        ``outside_sampler`` skips).
        """
        running: dict[RequestProfile, State] = {}
        for ident, state in list(self.loops.items()):
            task = current_task(state.loop)
            frame = frames.get(ident)
            if task is None or frame is None:
                continue
            if ident != main_ident:
                request = self.tasks.get(task)
            elif main_frame is None:
                frame = outside_sampler(frame)  # a thread tick may catch the handler
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
        jobs: dict[Job, State] = {}
        blocked: list[tuple[RequestProfile, int, types.FrameType]] = []
        for ident, job in list(self.threads.items()):
            frame = frames.get(ident)
            request = job.request
            if frame is None or request.closed:
                continue
            job.seen = True
            if job.submitted_from is not None and waits_for_its_loop(frame):
                # asgiref's ``async_to_sync`` on the job's thread: the work runs on the
                # event loop (sampled there) while this thread waits for it. (Django
                # under ASGI runs an async view so behind any sync-only middleware.)
                continue
            if job.submitted_from is None:
                if blocked_in_wait(frame):
                    blocked.append((request, ident, frame))  # (its jobs are not all read yet)
                else:
                    running[request] = Running(thread_stack(ident, frame))
            else:  # frames above the job wrapper, under the stack that submitted it
                tail = thread_stack(ident, frame, job.stop_code)[1:]
                jobs[job] = Running(job.submitted_from + tail, worker=True)
        if blocked:
            # A request's own thread blocked on a lock while a job of its runs on a worker
            # thread waits for that job (``Future.result()``; asgiref's ``async_to_sync``
            # under WSGI, which runs the coroutine on a loop in a worker thread): the job's
            # time is what it waits for, counted once, as for a task waiting on its job.
            with_jobs = {job.request for job in jobs}
            for request, ident, frame in blocked:
                if request not in with_jobs:
                    running[request] = Running(thread_stack(ident, frame))
        return running, jobs

    def _task_request(self, state: LoopState, task: asyncio.Task[Any]) -> RequestProfile | None:
        """The request whose task ``task`` is (a main-thread loop, ticked by a thread)."""
        request = self.tasks.get(task)
        if request is None and state.driven:  # driven loops do not fill ``tasks``
            for candidate, its_task in list(state.requests.items()):
                if its_task is task or candidate.producer is task:  # (its response's task)
                    return candidate
        return request


def note_prefix(state: LoopState, ident: int, task: asyncio.Task[Any]) -> None:
    """Learn the loop's own frames below a task's coroutine from the task registering a
    request (a tick learns them only once it finds a task running): the stacks of the
    requests seen waiting before then start at the thread, in one tree with the rest."""
    root = getattr(task.get_coro(), "cr_frame", None)
    stack, below_root = running_stack(ident, sys._getframe(), root)
    if below_root:
        state.prefix = stack[:below_root]


def waits_for_its_loop(frame: types.FrameType) -> bool:
    """Whether a worker thread at ``frame`` waits in asgiref's ``async_to_sync`` for a
    coroutine it handed to the event loop (``CurrentThreadExecutor.run_until_future``
    waiting on its condition), rather than doing work of its own.

    A job whose callback it runs meanwhile (``sync_to_async`` back onto this thread)
    is deeper in that call and is work: only the wait itself is matched.
    """
    if frame.f_code.co_name != "wait":
        return False
    caller = frame.f_back
    return (
        caller is not None
        and caller.f_code.co_name == "run_until_future"
        and "asgiref" in caller.f_code.co_filename
    )


def blocked_in_wait(frame: types.FrameType) -> bool:
    """Whether a thread at ``frame`` is blocked in ``threading.Condition.wait`` (under
    ``Future.result``, ``Event.wait``, asgiref's ``run_until_future``...)."""
    return frame.f_code is _CONDITION_WAIT


_CONDITION_WAIT = threading.Condition.wait.__code__


def driven(request: RequestProfile) -> bool:
    """Whether ``request`` is registered on a loop that SIGPROF ticks."""
    registration = request.registration
    return type(registration) is LoopState and registration.driven
