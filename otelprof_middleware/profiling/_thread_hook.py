"""Hook mode on a thread without an event loop: pyinstrument's hook while a request runs.

A WSGI worker or a test client's thread runs one request at a time, so the hook
installed for a profiled request records that request's calls only. (On an event
loop the hook is confined to the request's own task steps instead: ``_loop_hook``.)
Under gevent or eventlet a worker's greenlets take turns on one OS thread and share its
profile function, so they share its hook: each sample goes to the request of the
greenlet that runs (its own contextvars).
"""

from __future__ import annotations

import gc
import sys
import threading
import types
from typing import Any

from pyinstrument.low_level.stat_profile import setstatprofile
from pyinstrument.stack_sampler import build_call_stack

from .. import _clock
from .._failsafe import count, raised_by_signal_handler
from ._green import green_threads
from ._request_profile import current_request
from .always_on._registry import blocked_in_wait

__all__ = ["ThreadHook", "os_thread_id", "other_profiler_here", "thread_hook"]


def os_thread_id() -> int:
    """The OS thread running now. ``threading.get_ident()`` names the running greenlet
    once gevent or eventlet has monkey-patched threading; a profile function belongs to
    the OS thread (``get_native_id`` is not patched)."""
    return threading.get_native_id()


def other_profiler_here(ours: object) -> bool:
    """Whether another tool profiles this thread, so a hook of ours must not go on it.

    ``ours``: what ``sys.getprofile()`` returns while our hook is installed here (None if
    it is not). A profile function is per thread, so installing ours would replace
    theirs, and removing ours later would leave the thread with none. yappi and memray
    install a C function that ``sys.getprofile()`` does not show; they profile every
    thread through ``threading.setprofile``, which is what tells they are running.
    """
    installed = sys.getprofile()
    return (installed is not None and installed is not ours) or threading.getprofile() is not None


class ThreadHook:
    """The pyinstrument hook of a thread without an event loop (a WSGI worker, a test
    client's thread), installed while a profiled request runs there.

    Each sample goes to the request that is current: the thread's one request, or, where
    greenlets take turns on the thread, the running greenlet's (their ``users`` add up, and
    the last one out removes the hook). (On an event loop the hook runs only in the
    profiled request's own task steps: see ``_loop_hook``.) Only ever touched from its own
    OS thread (``acquire`` and ``release`` run where the request runs), so it needs no
    lock.

    The hook is never removed from inside pyinstrument's C hook, not even from our own
    callback: removing it frees state the C code may still use (a use-after-free:
    segfaults, or pyinstrument's "failed to get value of the context var" raised into the
    app's own frames; under load, about 1 Flask test-client run in 6 before, none in 30
    after). The ways in are our callback and finalizers: the garbage collector, run by an
    allocation inside the C hook, collects a response the client never closed, and that
    ends its profile. So a release from a finalizer, during a collection on its thread or
    inside our callback only counts the user out, and an unused hook stays installed,
    sampling nothing, until this thread's next profiled request replaces it or releases it
    from its own code.
    """

    __slots__ = ("_in_event", "_installed", "_last", "interval", "thread_id", "users")

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.thread_id = os_thread_id()
        self.users = 0
        self._last = 0.0
        self._in_event = False
        self._installed: object = None  # what sys.getprofile() returns while it is installed

    def acquire(self) -> bool:
        """Install the hook on this thread unless it is already installed.

        Returns False, and does nothing, when another profiler's hook is on this thread
        (:func:`other_profiler_here`): theirs is left alone.
        """
        if self.users <= 0 and other_profiler_here(self._installed):
            return False
        self.users += 1
        if self.users > 1:
            return True
        # ``users`` is counted first: the hook may fire as soon as it is installed, and
        # a hook that sees no users records nothing.
        self._last = _clock.perf_counter()
        try:
            setstatprofile(target=self._on_event, interval=self.interval)
            self._installed = sys.getprofile()
        except BaseException:
            self.users -= 1
            setstatprofile(None)
            raise
        return True

    def release(self, *, from_finalizer: bool = False) -> None:
        """Remove the hook when the last profiled request on this thread ends.

        From a finalizer, during a garbage collection on this thread or inside the hook's own
        callback, the hook is left installed, unused, until the next request on this thread
        (see the class docstring).
        """
        self.users -= 1
        if self.users <= 0:
            self.users = 0
            if (
                not (from_finalizer or self._in_event or _collecting_on == self.thread_id)
                and sys.getprofile() is self._installed  # (not a hook the app set since)
            ):
                setstatprofile(None)

    def _on_event(self, frame: types.FrameType, event: str, arg: Any) -> None:
        # An exception escaping here would remove the hook *and* surface in the user's
        # code, so nothing may escape.
        self._in_event = True  # (CPython never re-enters a profile function)
        try:
            if self.users <= 0:  # the last request ended elsewhere, or inside a callback
                return  # removed at a safe point of ours (see the class docstring)
            now = _clock.perf_counter()
            elapsed = now - self._last
            self._last = now
            request = current_request.get()
            if request is not None and not request.closed:
                if request.worker_seconds:
                    # Its jobs' samples on worker threads since this thread's last one.
                    # Blocked in a condition's wait (``Future.result()``, asgiref's
                    # ``async_to_sync`` under WSGI), the thread waited for them: that time
                    # is theirs, not counted twice. Running, it did not wait for them.
                    if blocked_in_wait(frame):
                        elapsed = request.wait_beyond_jobs(elapsed)
                    else:
                        request.worker_seconds = 0.0
                request.add(build_call_stack(frame, event, arg), elapsed)
        except Exception as exc:
            if raised_by_signal_handler(exc):
                raise  # the app's (pyinstrument removes the hook, and it reaches the app)
            count("failed.sample")
        finally:
            self._in_event = False


# The thread running a garbage collection, if one runs: its finalizers may run inside that
# thread's C hook. (Only one thread collects at a time. A finalizer's Python code can let
# other threads run mid-collection: their hooks are not the one in use, so they may go.)
_collecting_on: int | None = None


def _note_collection(phase: str, info: dict[str, int]) -> None:
    global _collecting_on
    _collecting_on = os_thread_id() if phase == "start" else None


def _follow_collections() -> None:
    """Follow garbage collections from the first thread hook on (see ``release``).

    Not at import: a process that never installs a thread hook (the always-on default,
    an ASGI app) keeps ``gc.callbacks`` as it was, and its collections call nothing of
    ours.
    """
    if _note_collection not in gc.callbacks:
        gc.callbacks.append(_note_collection)


_local = threading.local()
# Greenlets' hooks, by OS thread: ``threading.local`` is per greenlet once gevent has
# patched it, and each greenlet's own hook saw another's as a foreign profiler's.
_green_hooks: dict[int, ThreadHook] = {}


def thread_hook(interval: float) -> ThreadHook:
    """The hook of the calling thread (created on first use); of its OS thread, for a
    greenlet."""
    hook: ThreadHook | None = getattr(_local, "hook", None)
    if hook is None:
        _follow_collections()
        if green_threads() is None:
            hook = ThreadHook(interval)
        else:  # (a patched process has a few OS threads: the dict stays small)
            hook = _green_hooks.get(os_thread_id())
            if hook is None:
                hook = _green_hooks[os_thread_id()] = ThreadHook(interval)
        _local.hook = hook
    return hook
