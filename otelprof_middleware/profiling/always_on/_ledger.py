"""Always-on: the crediting arithmetic. What each request was doing between two ticks.

A tick sees each registered request in one state: :class:`Running` (its stack on a
thread) or :class:`Waiting` (its task suspended on a future), or nowhere; and each worker
job a request runs in a state of its own (a request may run several jobs at once, and
its task on the event loop meanwhile). The interval since the previous tick is credited
to the previous and the current state by :func:`credit`; a wait is credited in one piece
when it ends (:func:`close_wait`). :class:`Ledger` keeps the states from one tick to the
next.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ... import _clock
from .._request_profile import RequestProfile
from ._stacks import await_stack

if TYPE_CHECKING:
    from ._registry import Job, LoopState

__all__ = [
    "Interval",
    "Ledger",
    "Running",
    "State",
    "Waiting",
    "add_time",
    "close_wait",
    "common_prefix",
    "credit",
    "frozen_since_start",
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
            # state); of the sleep, on average half. Never more than its age. A thread
            # that sat still since it started (waiting for the GIL behind busy threads,
            # or blocked in a call) sat still where it is now: that time is this state's.
            age = _age(request)
            share = min(age, elapsed, gil_wait + slept / 2)
            if type(now) is Running and not now.worker:
                share = max(share, min(elapsed, frozen_since_start(request, age)))
            add_time(request, now, share)
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


def frozen_since_start(request: RequestProfile, age: float) -> float:
    """How long the thread of ``request`` (registered on a thread of its own) did not
    run in the ``age`` seconds since it started: its age less its CPU time since.

    A thread's stack changes only while it runs; once it stops (it waits for the GIL
    behind busy threads, or blocks in a call), it stays where a tick finds it. So when
    a tick, late behind busy threads, first sees a request, the time its thread sat
    still is the time of the stack the tick sees: with one stretch of running since the
    start (the usual case when the sampler itself waits its turn for the GIL), exactly;
    its CPU time stays unattributed. 0.0 where the platform has no thread CPU clocks.
    """
    thread_cpu = request.thread_cpu
    if thread_cpu is None:
        return 0.0
    clock, began = thread_cpu
    try:
        used = time.clock_gettime(clock) - began
    except OSError:  # the thread is gone
        return 0.0
    return age - used if used < age else 0.0


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


class Ledger:
    """Each registered request's and worker job's state at the last tick, and what a
    tick credits."""

    __slots__ = ("job_states", "running_before", "states")

    def __init__(self) -> None:
        # Each request's state at the last tick: its own task's (or thread's).
        self.states: dict[RequestProfile, State] = {}
        self.job_states: dict[Job, State] = {}  # each worker job's at the last tick
        self.running_before: list[RequestProfile] = []  # running at the last tick

    def credit_tick(
        self,
        loops: list[LoopState],
        running: dict[RequestProfile, State],
        jobs: dict[Job, State],
        interval: Interval,
    ) -> None:
        """Credit ``interval`` to every registered request: ``running`` (on its own task
        or thread), its worker ``jobs``, the tasks waiting on ``loops``, and those that
        ran at the last tick and are nowhere now.

        A request still waiting on the same future as at the last tick costs one
        identity check: its wait is credited in one piece when it ends. A request seen
        waiting for the first time (the other common case: with many short requests
        waiting, a tick finds a new one every few) is credited inline, see below. A
        request whose task waits while a job of its runs on a worker thread is not
        waiting meanwhile: the job's time is what it waits for (counted once).
        """
        states = self.states
        end = interval.end
        # Requests with a job on a worker thread now -> when the first of them began.
        with_jobs: dict[RequestProfile, float] = {}
        for job in jobs:
            began = with_jobs.get(job.request)
            if began is None or job.began < began:
                with_jobs[job.request] = job.began
        # What :func:`credit` gives a state first seen at this tick, before its age cap.
        first_share = min(interval.elapsed, interval.gil_wait + interval.slept / 2)
        for state in loops:
            prefix = state.prefix or []
            for request, task in list(state.requests.items()):
                if request.producer is not None:  # its body streams from another task
                    task = request.producer  # type: ignore[assignment]
                before = states.get(request)
                if with_jobs and request in with_jobs:  # it waits for its job(s)...
                    if before is not None and request not in running:  # (...or runs too)
                        self.hand_over(request, before, with_jobs[request], interval)
                    continue
                # A suspended task waits on one future until it runs again: the same
                # future as last tick means the same wait (the common case).
                future = getattr(task, "_fut_waiter", None)
                if type(before) is Waiting and before.future is future and future is not None:
                    continue
                if request in running or request.closed:
                    continue
                # (A task that waits on a future is not done: ``done()`` is asked only when
                # it waits on none.)
                if future is None and task.done():
                    if before is not None:
                        self.change(request, before, None, interval)
                    continue
                waiting = Waiting(future, await_stack(prefix, task.get_coro()), end)
                if before is not None:
                    self.change(request, before, waiting, interval)
                    continue
                # First seen, waiting: what ``change(request, None, waiting, interval)`` does,
                # without its calls (there is no previous state to close or to split the
                # interval with): the state's share of the interval, at most its age.
                age = _age(request)
                request.add_wait(waiting.stack, age if age < first_share else first_share)
                if not request.closed:  # (closed: its profile ended during this tick)
                    states[request] = waiting
        for request, now in running.items():
            self.change(request, states.get(request), now, interval)
        for request in self.running_before:
            # Ran at the last tick; neither running nor waiting on a loop now (its job
            # ended): its share of the interval, then forget it.
            if request not in running:
                before = states.get(request)
                if type(before) is Running:
                    self.change(request, before, None, interval)
        self.running_before = list(running)
        if jobs or self.job_states:
            self.credit_jobs(jobs, interval)

    def credit_jobs(self, jobs: dict[Job, State], interval: Interval) -> None:
        """Credit ``interval`` to each worker job running now or at the last tick."""
        job_states = self.job_states
        start = interval.end - interval.elapsed
        for job, now in jobs.items():
            before = job_states.get(job)
            began = job.began if before is None and job.began > start else None
            _credit_change(job.request, before, now, interval, began)
            if job.request.closed:
                job_states.pop(job, None)
            else:
                job_states[job] = now
        for job in [j for j in job_states if j not in jobs]:  # gone without its end
            before = job_states.pop(job)
            if not job.request.closed:
                _credit_change(job.request, before, None, interval)

    def change(
        self,
        request: RequestProfile,
        before: State | None,
        now: State | None,
        interval: Interval,
    ) -> None:
        """Credit ``request``'s interval to ``before`` and ``now``; ``now`` is its state."""
        _credit_change(request, before, now, interval)
        if now is None or request.closed:  # (closed: its profile ended during this tick)
            self.states.pop(request, None)
        else:
            self.states[request] = now

    def hand_over(
        self, request: RequestProfile, before: State, job_began: float, interval: Interval
    ) -> None:
        """``request``'s task waits for a job of its on a worker thread, which began at
        ``job_began``: its state up to then is credited, and forgotten."""
        start = interval.end - interval.elapsed
        if job_began > start:  # the job began in this interval: the split is known
            close_wait(request, before, start)
            add_time(request, before, min(interval.elapsed, job_began - start))
        else:
            _credit_change(request, before, None, interval)
        self.states.pop(request, None)

    def jobs_ended(self, request: RequestProfile, began: float, ended: float) -> None:
        """A worker job of ``request`` ran from ``began`` to ``ended``, and its time is
        recorded under the job's stack: its task's wait meanwhile is not recorded too.

        A job no tick saw (a 10 ms sync stream chunk, whose ticks wait for the GIL
        behind it) gets its whole time at its end; the task that awaited it was seen
        waiting before the job began, or is first seen waiting by the tick the job's end
        makes. Both counted it: with one request at a time, profiles of sync streams held
        nearly twice the request's duration. (A job a tick saw hands its task's state
        over then, see :meth:`hand_over`.)
        """
        request.last_job = (began, ended)
        state = self.states.get(request)
        if type(state) is Waiting and state.seen_at < ended:
            queued = began - state.seen_at  # (waiting for a worker thread: the task's own)
            if queued > 0:
                request.add_wait(state.stack, queued)
            state.seen_at = ended

    def sweep(self) -> None:
        """Forget the states of requests unregistered while a tick was running."""
        states = self.states
        for request in [r for r in states if r.closed]:
            states.pop(request, None)
        job_states = self.job_states
        for job in [j for j in job_states if j.request.closed]:
            job_states.pop(job, None)


def _credit_change(
    request: RequestProfile,
    before: State | None,
    now: State | None,
    interval: Interval,
    job_began: float | None = None,
) -> None:
    """Credit ``request``'s interval to ``before`` and ``now``.

    ``job_began``: ``now`` is a worker job that began at that moment of the interval,
    so the interval is split there rather than halfway.
    """
    start = interval.end - interval.elapsed
    close_wait(request, before, start)
    last_job = request.last_job
    if (
        last_job is not None
        and last_job[1] > start
        and (type(before) is Waiting or type(now) is Waiting)
    ):
        interval = _less_job(interval, start, last_job)
    if job_began is not None and now is not None:
        own = min(interval.elapsed, interval.end - job_began)
        if before is not None and interval.elapsed > own:
            add_time(request, before, interval.elapsed - own)
        add_time(request, now, own)
    else:
        credit(request, before, now, interval)


def _age(request: RequestProfile) -> float:
    """How long ``request`` has had time of its own to credit: since it started, or since
    its last worker job ended (the time before that is the job's, see ``jobs_ended``)."""
    since = request.start_perf
    last_job = request.last_job
    if last_job is not None and last_job[1] > since:
        since = last_job[1]
    return _clock.perf_counter() - since


def _less_job(interval: Interval, start: float, job: tuple[float, float]) -> Interval:
    """``interval`` (from ``start``) less its overlap with ``job``'s run (began, ended),
    which the job recorded while the task waited for it: its parts shrunk alike."""
    covered = min(job[1], interval.end) - max(job[0], start)
    if covered <= 0.0:
        return interval
    if covered >= interval.elapsed:
        return Interval(interval.end, 0.0, 0.0, 0.0)
    kept = 1.0 - covered / interval.elapsed
    return Interval(
        interval.end, interval.elapsed * kept, interval.slept * kept, interval.gil_wait * kept
    )
