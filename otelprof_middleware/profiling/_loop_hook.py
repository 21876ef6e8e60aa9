"""Hook mode on an event loop: pyinstrument's hook on only while the request's tasks run.

pyinstrument's ``setstatprofile`` hook is per thread: installed for one request, it
makes every call of every task on that event loop go through it, and a 1% sample of
requests slowed all of them (uvicorn ``/io`` at 64 connections: 0.70-0.88 x OTel-only).
Here the hook is confined to the profiled request's own execution instead:

* The adapter awaits the app through a :class:`HookedCoroutine`, and the loop's task
  factory (:func:`install_task_factory`) wraps the coroutine of every task created while
  a hook-mode request is current (its child tasks: ``asyncio.gather``, anyio task groups,
  Starlette's ``BaseHTTPMiddleware``). Tasks of other requests are created untouched.
* Each step of a wrapped coroutine (one ``send``/``throw``: from a resume to the next
  suspension) installs the hook, runs, and removes it. Between steps other tasks run
  with no hook at all.
* Time between the request's steps is a wait: it is recorded under the stack where the
  request's main coroutine is suspended, plus pyinstrument's ``[await]`` frame, as
  pyinstrument's async mode shows it. A child task's step interrupts that wait (its own
  frames are sampled, under the stack that created the task), so nothing counts twice.

The hook is removed by the step itself, in plain Python code after the coroutine
yielded: never from inside pyinstrument's C callback (see ``ThreadHook``).
"""

from __future__ import annotations

import asyncio
import collections.abc
import sys
import threading
import types
from collections.abc import Callable, Coroutine, Generator
from typing import Any

from pyinstrument.low_level.stat_profile import setstatprofile

from .. import _clock
from .._failsafe import count, log_failure, raised_by_signal_handler
from ._frames import frame_stack, stack_above
from ._request_profile import RequestProfile
from ._task_factory import wrap_coroutines
from ._thread_hook import other_profiler_here
from .always_on._registry import current_task
from .always_on._stacks import chain_stack

__all__ = ["HookedCoroutine", "install_task_factory", "note_hooked_producer", "submitting_stack"]


class _ThreadState(threading.local):
    """What the hook of this thread samples into (one step at a time, or nested)."""

    request: RequestProfile | None = None
    prefix: list[str] = []  # noqa: RUF012  (replaced, never mutated)
    last = 0.0  # when the hook last credited time
    depth = 0  # steps running inside one another (a task run eagerly by another's step)
    hook: object = None  # what sys.getprofile() returns while our hook is installed


_state = _ThreadState()


def _on_event(frame: types.FrameType, event: str, arg: Any) -> None:
    # Called by pyinstrument's C hook every ``interval``: nothing may escape.
    try:
        state = _state
        now = _clock.perf_counter()
        elapsed = now - state.last
        state.last = now
        request = state.request
        if request is not None and not request.closed:
            request.add(state.prefix + stack_above(frame, event, arg, _STOP_CODES), elapsed)
    except Exception as exc:
        if raised_by_signal_handler(exc):
            raise  # the app's (pyinstrument removes the hook, and it reaches the app)
        count("failed.sample")


class HookedCoroutine(collections.abc.Coroutine[Any, Any, Any]):
    """A coroutine of a hook-mode request: each of its steps runs under the hook.

    ``prefix``: the frames its samples go under (the task's creation stack, for a child
    task); None: the frames below the first step (the adapter's own coroutine).
    ``main``: this is the request's own coroutine, whose suspensions are its waits.

    Looks like the coroutine it wraps to code that inspects a task's coroutine (anyio
    reads ``cr_frame`` and friends).
    """

    __slots__ = ("_coro", "_main", "_prefix", "_request")

    def __init__(
        self,
        coro: Coroutine[Any, Any, Any],
        request: RequestProfile,
        *,
        main: bool,
        prefix: list[str] | None = None,
    ) -> None:
        self._coro = coro
        self._request = request
        self._main = main
        self._prefix = prefix

    def send(self, value: Any) -> Any:
        """Run one step of the wrapped coroutine under the hook."""
        return self._step(self._coro.send, value)

    def throw(self, *args: Any) -> Any:
        """Throw into the wrapped coroutine (a cancellation, say) under the hook."""
        return self._step(self._coro.throw, *args)

    def close(self) -> None:
        """Close the wrapped coroutine (no hook: this may run from a finalizer)."""
        self._coro.close()

    def is_child_of(self, request: RequestProfile) -> bool:
        """Whether this is the coroutine of a task ``request`` created (not its own)."""
        return self._request is request and not self._main

    def __await__(self) -> Generator[Any, None, Any]:
        return self

    def __iter__(self) -> HookedCoroutine:
        return self

    def __next__(self) -> Any:
        return self._step(self._coro.send, None)  # (what ``await`` calls first)

    def __getattr__(self, name: str) -> Any:
        # What inspect.getcoroutinestate, anyio and asyncio's reprs read (``cr_frame``,
        # ``cr_running``, ``__qualname__``...): the wrapped coroutine's.
        if name == "_coro":  # not set yet (a failed __init__): no recursion
            raise AttributeError(name)
        return getattr(self._coro, name)

    def __repr__(self) -> str:
        return repr(self._coro)

    def _step(self, method: Callable[..., Any], *args: Any) -> Any:
        request = self._request
        state = _state
        if request.closed or request.hook_failed:
            return method(*args)
        if state.depth:  # inside another step of ours on this thread: its hook samples
            return self._nested_step(state, method, args)
        if other_profiler_here(state.hook):
            count("skipped.foreign_hook")  # another profiler's hook: leave it alone
            return method(*args)
        now = _clock.perf_counter()
        request.resume(now)  # the wait so far (the main coroutine's) ends here
        prefix = self._prefix
        if prefix is None:  # the adapter's frames below this coroutine, once
            prefix = self._prefix = frame_stack(sys._getframe(2))[::-1]
        state.request = request
        state.prefix = prefix
        state.last = now
        state.depth = 1
        try:
            setstatprofile(target=_on_event, interval=request.interval)
            state.hook = sys.getprofile()
        except Exception as exc:
            # The request goes on unprofiled: a profile missing some of its steps would
            # mislead, so it is not kept.
            state.depth = 0
            state.request = None
            request.hook_failed = True
            log_failure("profiler.start", exc)
            return method(*args)
        finished = True
        try:
            result = method(*args)
            finished = False
            return result
        finally:
            self._step_done(state, request, finished)

    def _step_done(self, state: _ThreadState, request: RequestProfile, finished: bool) -> None:
        """Remove the hook; credit the step's tail; the request waits from now on."""
        state.depth = 0
        state.request = None  # a hook left installed samples nothing from here on
        try:
            if sys.getprofile() is state.hook:
                setstatprofile(None)
            state.hook = None
        except Exception as exc:
            # Left installed (recognised as ours at the next step, which replaces it).
            log_failure("profiler.stop", exc)
        now = _clock.perf_counter()
        if request.closed:
            return
        tail = now - state.last
        # Whose suspensions are the request's waits: its own coroutine's, or, once its
        # body streams from a child task, that task's (``ProfilerCore.response_sent_here``).
        producer = request.producer
        if finished:
            request.add(self._prefix or [], tail)
            if producer is self:
                request.producer = None  # (gone: the request's own coroutine again)
                request.wait_stack = None
            elif self._main:
                request.wait_stack = None
        else:
            where = chain_stack(self._prefix or [], self._coro)  # ([await] added as it waits)
            request.add(where, tail)  # ran since the last sample, up to this await
            if producer is self or (self._main and producer is None):
                request.wait_stack = where
        if request.wait_stack is not None:  # its own coroutine waits (again) from now
            request.suspend(request.wait_stack, now)

    def _nested_step(
        self, state: _ThreadState, method: Callable[..., Any], args: tuple[Any, ...]
    ) -> Any:
        """A step run inside another (an eagerly started task): sampled as its own frames."""
        outer_request, outer_prefix = state.request, state.prefix
        prefix = self._prefix
        if prefix is None:
            prefix = self._prefix = frame_stack(sys._getframe(3))[::-1]
        state.request, state.prefix = self._request, prefix
        state.depth += 1
        try:
            return method(*args)
        finally:
            state.depth -= 1
            state.request, state.prefix = outer_request, outer_prefix


# A step's own frames start above one of these (the wrapped coroutine's send/throw).
_STOP_CODES = (HookedCoroutine._step.__code__, HookedCoroutine._nested_step.__code__)


def note_hooked_producer(request: RequestProfile) -> None:
    """Hook mode: the response of ``request`` starts from the current task. When that
    is a task the request created (its coroutine wrapped here), the request waits where
    that coroutine waits from now on (see ``ProfilerCore.response_sent_here``)."""
    loop = asyncio._get_running_loop()
    task = current_task(loop) if loop is not None else None
    coro = task.get_coro() if task is not None else None
    if type(coro) is HookedCoroutine and coro.is_child_of(request):
        request.producer = coro


def submitting_stack(frame: types.FrameType) -> list[str]:
    """The stack (root first) of ``frame`` on this thread, as this thread's hook samples
    it: in a step of a hook-mode request's task, the step's prefix (for a child task,
    the stack that created it) and the frames above the step; else the frames as they
    are. A task created or a job submitted to a worker thread from there goes under it."""
    state = _state
    if state.depth and state.request is not None:
        return state.prefix + stack_above(frame, "", None, _STOP_CODES)
    return frame_stack(frame)[::-1]


def install_task_factory(loop: asyncio.AbstractEventLoop) -> None:
    """Make ``loop`` wrap the coroutines of tasks created by hook-mode requests
    (idempotent; the loop's one factory of ours, ``_task_factory``)."""
    wrap_coroutines(loop, _wrap_child)


def _wrap_child(coro: Coroutine[Any, Any, Any], request: RequestProfile) -> HookedCoroutine:
    # Called by the loop's task factory, called where the task is created (in a child
    # task's step, a grandchild: under the child's own creation stack).
    created_at = submitting_stack(sys._getframe(2))
    return HookedCoroutine(coro, request, main=False, prefix=created_at)
