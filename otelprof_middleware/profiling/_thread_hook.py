"""Hook mode on a thread without an event loop: pyinstrument's hook while a request runs.

A WSGI worker or a test client's thread runs one request at a time, so the hook
installed for a profiled request records that request's calls only. (On an event
loop the hook is confined to the request's own task steps instead: ``_loop_hook``.)
"""

from __future__ import annotations

import gc
import sys
import threading
import time
import types
from typing import Any

from pyinstrument.low_level.stat_profile import setstatprofile
from pyinstrument.stack_sampler import build_call_stack

from .._failsafe import count, raised_by_signal_handler
from ._request_profile import current_request

__all__ = ["ThreadHook", "other_profiler_here", "thread_hook"]


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

    Requests never interleave on such a thread, so each sample goes to the request that is
    current. (On an event loop the hook runs only in the profiled request's own task
    steps: see ``_loop_hook``.) Only ever touched from its own thread (``acquire`` and
    ``release`` run where the request runs), so it needs no lock.

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
        self.thread_id = threading.get_ident()
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
        self._last = time.perf_counter()
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
            now = time.perf_counter()
            elapsed = now - self._last
            self._last = now
            request = current_request.get()
            if request is not None and not request.closed:
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
    _collecting_on = threading.get_ident() if phase == "start" else None


def _follow_collections() -> None:
    """Follow garbage collections from the first thread hook on (see ``release``).

    Not at import: a process that never installs a thread hook (the always-on default,
    an ASGI app) keeps ``gc.callbacks`` as it was, and its collections call nothing of
    ours.
    """
    if _note_collection not in gc.callbacks:
        gc.callbacks.append(_note_collection)


_local = threading.local()


def thread_hook(interval: float) -> ThreadHook:
    """The hook of the calling thread (created on first use)."""
    hook: ThreadHook | None = getattr(_local, "hook", None)
    if hook is None:
        _follow_collections()
        hook = ThreadHook(interval)
        _local.hook = hook
    return hook
