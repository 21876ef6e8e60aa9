"""Draining the writers and exporters when the process ends.

One ``atexit`` hook for the process, holding the writers and exporters weakly: a hook per
middleware held each writer for good, and a test suite that builds an app per test piled
them up (505 hooks after 500 apps). A writer with work left is held by its running
thread, so it is still here at exit.

And one multiprocessing exit finalizer: a worker that multiprocessing forked (granian's)
ends with ``os._exit`` after multiprocessing's own exit finalizers, and never runs
``atexit``. Where both run, the second drain finds nothing to do.
"""

from __future__ import annotations

import atexit
import multiprocessing.util
import os
import sys
import threading
import types
import weakref
from typing import Protocol

from .. import _clock
from .._failsafe import fail_open

__all__ = ["close_at_exit", "close_background"]


class _Closable(Protocol):
    def close(self, timeout: float = ...) -> None: ...


_to_close: weakref.WeakSet[_Closable] = weakref.WeakSet()
_to_close_strongly: list[_Closable] = []  # an exporter of the app's that takes no weakref


def close_at_exit(closable: _Closable) -> None:
    """Drain ``closable`` (``close(2.0)``) when the process ends."""
    try:
        _to_close.add(closable)
    except TypeError:
        _to_close_strongly.append(closable)


def close_background(timeout: float = 2.0) -> None:
    """Drain every live writer and exporter and end their threads (at exit, and in
    ``testing.reset()``); each starts again with its next profile."""
    for closable in [*_to_close, *_to_close_strongly]:
        with fail_open("writer.close"):
            closable.close(timeout)


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _close_after_requests() -> None:
    """In a forked worker about to ``os._exit``: wait (1 s at most) until no other thread
    runs this package's code, then drain. granian's worker returns as soon as its last
    response is sent, while the server thread that ran the request may still be in the
    body's ``close()``, keeping its profile: ``os._exit`` would end it before the profile
    reaches the writer. (Our own threads are named ``otelprof-*`` and not waited for.)"""
    with fail_open("writer.exit"):
        me = threading.get_ident()
        ours = {t.ident for t in threading.enumerate() if t.name.startswith("otelprof-")}
        deadline = _clock.monotonic() + 1.0
        while _clock.monotonic() < deadline and _package_code_running(me, ours):
            _clock.sleep(0.01)
    close_background()


def _package_code_running(me: int, ours: set[int | None]) -> bool:
    for ident, frame in sys._current_frames().items():
        if ident == me or ident in ours:
            continue
        current: types.FrameType | None = frame
        while current is not None:
            if current.f_code.co_filename.startswith(_PACKAGE_DIR):
                return True
            current = current.f_back
    return False


def _finalize_in_this_process(_: object = None) -> None:
    """Register the exit finalizer (again in each multiprocessing child: its bootstrap
    clears the finalizers it inherited, then runs the after-fork hooks)."""
    multiprocessing.util.Finalize(None, _close_after_requests, exitpriority=10)


class _AfterFork:
    """A weakly referenceable token for ``multiprocessing.util.register_after_fork``."""


_AFTER_FORK = _AfterFork()

# Registered at import, after the background threads' own exit note (atexit runs the
# later first): the writers drain before new threads are refused.
atexit.register(close_background)
_finalize_in_this_process()
multiprocessing.util.register_after_fork(_AFTER_FORK, _finalize_in_this_process)
