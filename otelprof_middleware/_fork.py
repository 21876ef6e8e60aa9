"""Locks that a forked child gets back unlocked, and what else a forked child redoes.

``fork()`` copies a lock in whatever state it is in. One held at that moment by another
thread of the parent (the sampler thread mid-tick, a writer thread starting or opening
the store) stays held for good in the child, whose first use of it then waits forever:
a request that forks (``subprocess`` does not, ``ProcessPoolExecutor`` with the fork
method and the OpenTelemetry SDK's after-fork hooks do) could hang its child. Objects
whose locks other threads take register here and get fresh locks in the child.

A child forked by C code does not run ``os.register_at_fork``'s hooks: uWSGI forks its
workers from the process that loaded the app and calls none of them (unless started with
``--py-call-osafterfork``). Every after-fork hook of the package therefore registers
through :func:`in_child`, and :func:`notice_fork` (called as a request starts) runs them
in a process whose pid changed without them.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Protocol

__all__ = [
    "PROCESS",
    "ForkSafe",
    "in_child",
    "may_profile_here",
    "notice_fork",
    "renew_locks_in_children",
]


class ForkSafe(Protocol):
    """An object whose locks are replaced in a forked child."""

    def renew_locks(self) -> None:
        """Replace every lock of this object with a new, unlocked one (in the child)."""


_owners: weakref.WeakSet[ForkSafe] = weakref.WeakSet()


def renew_locks_in_children(owner: ForkSafe) -> None:
    """Have ``owner.renew_locks()`` called in every child forked from now on (held weakly)."""
    _owners.add(owner)


def _renew_owners_locks() -> None:
    for owner in list(_owners):
        with contextlib.suppress(Exception):  # never fail a fork: the child runs on
            owner.renew_locks()


_hooks: list[Callable[[], None]] = [_renew_owners_locks]
PROCESS = [os.getpid()]
"""``PROCESS[0]``: this process's id, kept current across ``fork`` by the after-fork
hooks (no syscall; the sampler reads it inline). The process they last ran for."""
_notice_lock = threading.Lock()  # taken only in a process whose pid changed: never at a fork


def in_child(hook: Callable[[], None]) -> None:
    """Run ``hook`` in every child forked from now on, once, first thing: through
    ``os.register_at_fork``, or at the child's first :func:`notice_fork` when the fork
    bypassed it. Hooks run in the order they were registered."""
    _hooks.append(hook)


def _after_fork_in_child() -> None:
    PROCESS[0] = os.getpid()
    for hook in list(_hooks):
        with contextlib.suppress(Exception):  # never fail a fork: the child runs on
            hook()


def notice_fork() -> None:
    """Run the after-fork hooks now if this process was forked without them (uWSGI's
    workers): one ``getpid()`` otherwise."""
    if PROCESS[0] == os.getpid():
        return
    with _notice_lock:
        if PROCESS[0] != os.getpid():
            _after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def may_profile_here() -> bool:
    """At a request's start: run the after-fork hooks if this process was forked without
    them (:func:`notice_fork`), and say whether this process may profile at all: not
    uWSGI's master, nor a uWSGI process before it forks its workers.

    uWSGI forks its workers from C, without Python's after-fork hooks, and (with a
    master) with the GIL released. A Python thread of ours running in the forking
    process at that moment, started by a request it served (a warm-up at import),
    left the GIL held for good in a worker, or Python's thread state stale, and the
    worker hung (1 start in 4 to 7 with a master, 4 in 10 without). So such a process
    starts no thread of ours: it profiles nothing. Elsewhere: one ``getpid()`` and a
    dict lookup (one call: it runs on every request).
    """
    if PROCESS[0] != os.getpid():
        notice_fork()
    uwsgi = sys.modules.get("uwsgi")
    if uwsgi is None:
        return True
    try:
        return bool(uwsgi.worker_id() != 0)  # (0: the master, or not forked yet)
    except Exception:  # (an older or stub ``uwsgi`` module)
        return True
