"""Worker-thread work inside the request's profile (FastAPI ``def`` endpoints and friends).

FastAPI and Starlette run ``def`` endpoints, sync dependencies, ``run_in_threadpool``
and sync streaming bodies through ``anyio.to_thread.run_sync``; ``loop.run_in_executor``
and ``asyncio.to_thread`` go through ``concurrent.futures.ThreadPoolExecutor.submit``.
A hook on the event loop thread sees that work only as an opaque ``[await]``.

While a profiled request is current in the submitting context, :func:`install` makes
both entry points run the job through :func:`run_profiled`, which, on the worker thread,
installs a short-lived pyinstrument hook for exactly the job's duration and grafts its
samples under the stack that submitted the job (as the loop's hook samples it: a child
task's steps under the stack that created the task; the request it belongs to is captured
at submission, so it works whether or not the executor copies contextvars). The loop's
``[await]`` for that wait is reduced by the time the worker's samples account for, so
nothing is counted twice. Jobs of unprofiled requests go straight through: one
contextvar read.
"""

from __future__ import annotations

import functools
import sys
import threading
import types
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import anyio.to_thread
from pyinstrument.low_level.stat_profile import setstatprofile

from .. import _clock
from .._failsafe import count, log_failure
from ._frames import stack_above
from ._loop_hook import submitting_stack
from ._request_profile import RequestProfile, current_request
from ._thread_hook import other_profiler_here
from .always_on import always_on_sampler, current_sampler
from .always_on._registry import waits_for_its_loop
from .always_on._stacks import job_identifier, submission_stack

__all__ = ["install", "run_profiled"]

T = TypeVar("T")

_installed = False


def install() -> None:
    """Route worker-thread jobs of profiled requests through the profiler.

    Wraps ``anyio.to_thread.run_sync`` and ``ThreadPoolExecutor.submit``. Idempotent.
    Jobs submitted while no profiled request is current pass through untouched.
    """
    global _installed
    if _installed:
        return
    _installed = True
    _wrap_anyio()
    _wrap_thread_pool_executor()


def _wrap_anyio() -> None:
    original = anyio.to_thread.run_sync

    @functools.wraps(original)
    async def run_sync(func: Callable[..., T], *args: object, **kwargs: Any) -> T:
        request = current_request.get()
        if request is None or request.closed:
            result: T = await original(func, *args, **kwargs)
            return result
        # Where the request waits for the job: the worker's frames go under it.
        submitted_from = _submitted_from(request, sys._getframe(1))
        job = functools.partial(run_profiled, request, submitted_from, func)
        result = await original(job, *args, **kwargs)
        return result

    anyio.to_thread.run_sync = run_sync  # type: ignore[assignment]


def _wrap_thread_pool_executor() -> None:
    original: Callable[..., Any] = ThreadPoolExecutor.submit

    @functools.wraps(original)
    def submit(
        self: ThreadPoolExecutor, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> Future[T]:
        request = current_request.get()
        if request is None or request.closed:
            future: Future[T] = original(self, fn, *args, **kwargs)
            return future
        submitted_from = _submitted_from(request, sys._getframe(1))
        job = functools.partial(run_profiled, request, submitted_from, fn)
        future = original(self, job, *args, **kwargs)
        return future

    ThreadPoolExecutor.submit = submit  # type: ignore[method-assign,assignment]


def _submitted_from(request: RequestProfile, frame: types.FrameType) -> list[str]:
    """The stack (root first) at ``frame``, where ``request`` submits a job, as the
    request's other samples have it: the always-on sampler's, rooted at this thread
    (as its ticks read the request's own thread); a hook's, as the hook samples it.
    The job's samples go under it, in one tree with the rest of the request."""
    if request.continuous:
        return submission_stack(threading.get_ident(), frame)  # (shared: never changed)
    return submitting_stack(frame)


def run_profiled(
    request: RequestProfile,
    submitted_from: list[str],
    func: Callable[..., T],
    *args: Any,
    **kwargs: Any,
) -> T:
    """Run ``func`` on this (worker) thread with a hook feeding ``request``'s profile."""
    stop_code = run_profiled.__code__
    stop = (stop_code,)
    if request.continuous:  # always-on mode: the sampler thread reads this thread
        # (made by the core when the request started; made again only after a test reset)
        sampler = current_sampler() or always_on_sampler(request.interval)
        sampler.register_worker(request, submitted_from, stop_code)
        try:
            return func(*args, **kwargs)
        finally:
            sampler.unregister_worker(func, args)
    if request.closed or other_profiler_here(None):
        return func(*args, **kwargs)  # a hook is already here (nested job, a profiler)
    last = _clock.perf_counter()

    def on_event(frame: types.FrameType, event: str, arg: Any) -> None:
        nonlocal last
        try:
            now = _clock.perf_counter()
            elapsed, last = now - last, now
            # In asgiref's ``async_to_sync`` this thread waits while the loop runs the
            # work (the loop's hook records it): the wait is not the request's time too.
            if not request.closed and not waits_for_its_loop(frame):
                tail = stack_above(frame, event, arg, stop)
                request.add_worker(submitted_from + tail, elapsed)
        except Exception:
            count("failed.sample")

    try:
        setstatprofile(target=on_event, interval=request.interval)
    except Exception as exc:
        log_failure("profiler.worker", exc)
        return func(*args, **kwargs)
    try:
        return func(*args, **kwargs)
    finally:
        setstatprofile(None)
        now = _clock.perf_counter()
        if not request.closed and now > last:  # the tail since the last sample
            request.add_worker([*submitted_from, job_identifier(func, args)], now - last)
