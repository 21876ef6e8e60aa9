"""Locks that a forked child gets back unlocked.

``fork()`` copies a lock in whatever state it is in. One held at that moment by another
thread of the parent (the sampler thread mid-tick, a writer thread starting or opening
the store) stays held for good in the child, whose first use of it then waits forever:
a request that forks (``subprocess`` does not, ``ProcessPoolExecutor`` with the fork
method and the OpenTelemetry SDK's after-fork hooks do) could hang its child. Objects
whose locks other threads take register here and get fresh locks in the child.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from typing import Protocol

__all__ = ["ForkSafe", "renew_locks_in_children"]


class ForkSafe(Protocol):
    """An object whose locks are replaced in a forked child."""

    def renew_locks(self) -> None:
        """Replace every lock of this object with a new, unlocked one (in the child)."""


_owners: weakref.WeakSet[ForkSafe] = weakref.WeakSet()


def renew_locks_in_children(owner: ForkSafe) -> None:
    """Have ``owner.renew_locks()`` called in every child forked from now on (held weakly)."""
    _owners.add(owner)


def _after_fork_in_child() -> None:
    for owner in list(_owners):
        with contextlib.suppress(Exception):  # never fail a fork: the child runs on
            owner.renew_locks()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
