"""Worker-thread work inside the request's profile (FastAPI ``def`` endpoints and friends).

FastAPI and Starlette run ``def`` endpoints, sync dependencies, ``run_in_threadpool``
and sync streaming bodies through ``anyio.to_thread.run_sync``. A hook on the event loop
thread sees that work only as an opaque ``[await]``. While a profiled request is current,
:func:`install` makes ``anyio.to_thread.run_sync`` run the job through
:func:`run_profiled`, which, on the worker thread, installs a short-lived pyinstrument
hook for exactly the job's duration and grafts its samples under the stack that
submitted the job. The loop's ``[await]`` for that wait is reduced by the time the
worker's samples account for, so nothing is counted twice. Unprofiled requests go
straight to anyio: one contextvar read.
"""

from __future__ import annotations

import functools
import sys
import time
import types
from collections.abc import Callable
from typing import Any, TypeVar

import anyio.to_thread
from pyinstrument.low_level.stat_profile import get_frame_info, setstatprofile
from pyinstrument.stack_sampler import build_call_stack

from ._failsafe import count
from ._session import RequestProfile, current_request

__all__ = ["install", "run_profiled"]

T = TypeVar("T")

_original_run_sync: Callable[..., Any] | None = None


def install() -> None:
    """Route ``anyio.to_thread.run_sync`` jobs of profiled requests through the profiler.

    Idempotent. Unprofiled calls are passed to anyio untouched.
    """
    global _original_run_sync
    if _original_run_sync is not None:
        return
    original = anyio.to_thread.run_sync
    _original_run_sync = original

    @functools.wraps(original)
    async def run_sync(func: Callable[..., T], *args: object, **kwargs: Any) -> T:
        request = current_request.get()
        if request is None or request.closed:
            result: T = await original(func, *args, **kwargs)
            return result
        # Where the request waits for the job: the worker's frames go under it.
        submitted_from = build_call_stack(sys._getframe(1), "initial", None)
        job = functools.partial(run_profiled, request, submitted_from, func)
        result = await original(job, *args, **kwargs)
        return result

    anyio.to_thread.run_sync = run_sync  # type: ignore[assignment]


def run_profiled(
    request: RequestProfile, submitted_from: list[str], func: Callable[..., T], *args: object
) -> T:
    """Run ``func`` on this (worker) thread with a hook feeding ``request``'s profile."""
    if sys.getprofile() is not None or request.closed:
        return func(*args)  # a hook is already here (nested job, another profiler)
    stop_code = run_profiled.__code__
    last = time.perf_counter()

    def on_event(frame: types.FrameType, event: str, arg: Any) -> None:
        nonlocal last
        try:
            now = time.perf_counter()
            elapsed, last = now - last, now
            if not request.closed:
                tail = _stack_above(frame, event, arg, stop_code)
                request.add_worker(submitted_from + tail, elapsed)
        except Exception:
            count("failed.sample")

    try:
        setstatprofile(target=on_event, interval=request.interval)
    except Exception:
        count("failed.profiler.worker")
        return func(*args)
    try:
        return func(*args)
    finally:
        setstatprofile(None)
        now = time.perf_counter()
        if not request.closed and now > last:  # the tail since the last sample
            request.add_worker([*submitted_from, _identifier(func)], now - last)


def _stack_above(
    frame: types.FrameType | None, event: str, arg: Any, stop_code: types.CodeType
) -> list[str]:
    """The frames between ``run_profiled`` (exclusive) and the sampled one, root first."""
    stack: list[str] = []
    if event == "call" and frame is not None:
        frame = frame.f_back
    elif event in ("c_return", "c_exception"):
        name = getattr(arg, "__qualname__", None) or getattr(arg, "__name__", "?")
        stack.append(f"{name}\x00<built-in>\x000")
    while frame is not None and frame.f_code is not stop_code:
        stack.append(get_frame_info(frame))
        frame = frame.f_back
    stack.reverse()
    return stack


def _identifier(func: Callable[..., Any]) -> str:
    code = getattr(func, "__code__", None)
    if code is None:
        name = getattr(func, "__qualname__", None) or type(func).__name__
        return f"{name}\x00<unknown>\x000"
    return f"{code.co_name}\x00{code.co_filename}\x00{code.co_firstlineno}"
