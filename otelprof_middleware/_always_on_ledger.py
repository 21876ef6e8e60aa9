"""Always-on: the crediting arithmetic. What each request was doing between two ticks.

A tick sees each registered request in one state: :class:`Running` (its stack on a
thread) or :class:`Waiting` (its task suspended on a future), or nowhere. The interval
since the previous tick is credited to the previous and the current state by
:func:`credit`; a wait is credited in one piece when it ends (:func:`close_wait`).
"""

from __future__ import annotations

import time

from ._session import RequestProfile

__all__ = [
    "Interval",
    "Running",
    "State",
    "Waiting",
    "add_time",
    "close_wait",
    "common_prefix",
    "credit",
]


class Running:
    """A request running at a tick: its stack (root first), on its own thread or a
    worker's (``worker``: a job it handed to a thread pool)."""

    __slots__ = ("stack", "worker")

    def __init__(self, stack: list[str], *, worker: bool = False) -> None:
        self.stack = stack
        self.worker = worker

    def __eq__(self, other: object) -> bool:
        return type(other) is Running and other.worker == self.worker and other.stack == self.stack

    __hash__ = None  # type: ignore[assignment]  # mutable stack: compared, never hashed


class Waiting:
    """A request's task waiting on one future: where, and since which tick.

    While the task waits on the same future, ticks only compare the future; the time is
    credited when the wait ends (``seen_at`` to the last tick that still saw it).
    """

    __slots__ = ("future", "seen_at", "stack")

    def __init__(self, future: object, stack: list[str], seen_at: float) -> None:
        self.future = future
        self.stack = stack  # ends with [await]
        self.seen_at = seen_at


State = Running | Waiting


class Interval:
    """The interval a tick credits: it ended at ``end`` after ``elapsed`` seconds, of
    which the sampler slept ``slept``; ``gil_wait``: the (capped) wait for the GIL after."""

    __slots__ = ("elapsed", "end", "gil_wait", "slept")

    def __init__(self, end: float, elapsed: float, slept: float, gil_wait: float) -> None:
        self.end = end
        self.elapsed = elapsed
        self.slept = slept
        self.gil_wait = gil_wait


def credit(
    request: RequestProfile, before: State | None, now: State | None, interval: Interval
) -> None:
    """Credit ``interval`` to the request's state at the previous tick and at this one."""
    elapsed, slept, gil_wait = interval.elapsed, interval.slept, interval.gil_wait
    if now is not None and before is not None and now == before:
        add_time(request, now, elapsed)
        return
    if before is None:  # started during the interval
        if now is not None:
            # The GIL wait was spent running (by whoever held it, most likely this
            # state); of the sleep, on average half. Never more than its age.
            age = time.perf_counter() - request.start_perf
            add_time(request, now, min(age, elapsed, gil_wait + slept / 2))
        return
    if type(before) is Running:  # the GIL wait was most likely spent running ``before``
        add_time(request, before, slept / 2 + gil_wait)
        if now is not None:
            add_time(request, now, slept / 2)
            # The rest of a long GIL wait ran somewhere between the two states: where they
            # agree (their common frames) is certain, anything deeper is not.
            rest = elapsed - slept - gil_wait
            if rest > 0 and type(now) is Running and now.worker == before.worker:
                common = common_prefix(before.stack, now.stack)
                if common:
                    add_time(request, Running(common, worker=before.worker), rest)
    else:  # a waiting request held no GIL: the wait went to what runs now
        add_time(request, before, slept / 2)
        if now is not None:
            add_time(request, now, slept / 2 + gil_wait)


def common_prefix(first: list[str], second: list[str]) -> list[str]:
    """The frames two root-first stacks share, from the root."""
    shared = 0
    for mine, theirs in zip(first, second, strict=False):
        if mine != theirs:
            break
        shared += 1
    return first[:shared]


def close_wait(request: RequestProfile, state: State | None, last_seen: float) -> None:
    """Credit a wait that ends: from the tick that first saw it to ``last_seen``, the last
    tick that still saw it unchanged (the ticks in between did not touch it)."""
    if type(state) is Waiting and last_seen > state.seen_at:
        request.add_wait(state.stack, last_seen - state.seen_at)


def add_time(request: RequestProfile, state: State, seconds: float) -> None:
    """Record ``seconds`` spent in ``state``."""
    if type(state) is Waiting:  # the stack ends with [await] already
        request.add_wait(state.stack, seconds)
    elif state.worker:  # type: ignore[union-attr]
        request.add_worker(state.stack, seconds)
    else:
        request.add(state.stack, seconds)
