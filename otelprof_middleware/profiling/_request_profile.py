"""One profile per request, routed by a contextvar: concurrent requests never mix.

How it works (the Go pprof-labels idea, on pyinstrument's own low-level hook):

* The request being profiled is kept in the contextvar ``current_request``. asyncio
  tasks copy their context when created, so the request's own task and every child task
  it spawns see it; other requests' tasks do not.
* On an event loop, pyinstrument's ``setstatprofile`` hook runs only during the steps
  of the profiled request's own tasks (``_loop_hook``): the time between its steps is
  recorded under the stack where it waits plus pyinstrument's ``[await]`` frame, as
  pyinstrument's own async mode shows it. On a thread without a loop (WSGI), one hook
  per thread (:class:`~._thread_hook.ThreadHook`) while a profiled request runs there.
* At the end, the request's records become a plain pyinstrument :class:`Session`, so all
  of pyinstrument's renderers draw it.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from contextvars import ContextVar

from pyinstrument.frame import AWAIT_FRAME_IDENTIFIER
from pyinstrument.session import Session

from .. import _clock
from .._failsafe import log_failure
from .._identifiers import ATTRIBUTES_SEP, NO_SAMPLES, is_thread_root
from ._frames import code_head

__all__ = [
    "RequestProfile",
    "add_stem_marker",
    "current_request",
]

current_request: ContextVar[RequestProfile | None] = ContextVar(
    "otelprof_current_request", default=None
)

_SYS_PREFIXES = Session.current_sys_prefixes()

FrameRecord = tuple[list[str], float]


class RequestProfile:
    """The samples of one request, appended by the hooks of whichever threads run it.

    No ``__slots__``: the class attributes below are the defaults, so creating one (on
    every profiled request, most of them discarded as too short) sets only what varies.
    The always-on start passes its arguments in order: a class called with keyword
    arguments builds a dict of them first.
    """

    # Defaults (class attributes); an instance sets its own only when they change.
    closed = False
    description = ""
    # Samples recorded (not dropped): a record that equal samples in a row extend counts
    # each of them, so a profile of 120 ms in one call says 24 samples, not 1.
    samples = 0
    dropped_samples = 0
    own_seconds = 0.0
    worker_seconds = 0.0
    registration: object = None  # always-on: its loop's state, or its thread's ident
    # Always-on, a request on a thread of its own (WSGI): its thread's CPU-time clock and
    # that clock's reading at registration, so that a late first tick can tell how long
    # the thread sat still since (see ``_ledger.frozen_since_start``).
    thread_cpu: tuple[int, float] | None = None
    suspended_at: float | None = None
    suspended_stack: list[str] | None = None
    wait_stack: list[str] | None = None  # hook mode on a loop: where its coroutine waits
    # Where the request waits once its body streams from a task of its own making
    # (Starlette's StreamingResponse): that task (always-on), its coroutine (hook mode).
    producer: object = None
    hook_failed = False  # hook mode on a loop: the hook could not be installed for a step
    left_app_at: float | None = None  # WSGI: when the app's call returned (perf_counter)
    # Always-on: when its last worker-thread job began and ended (perf_counter). Its
    # task's wait meanwhile was for the job, whose time is recorded under the job's stack.
    last_job: tuple[float, float] | None = None
    url_factory: Callable[[], str] | None = None  # makes ``url`` when first read
    _url: str | None = None
    _start_wall: float | None = None

    def __init__(
        self,
        interval: float,
        max_samples: int,
        start_call_stack: list[str] | None,
        continuous: bool = False,
        *,
        description: str = "",
    ) -> None:
        self.records: list[FrameRecord] = []
        self.continuous = continuous  # sampled by the always-on sampler, not a hook
        self.interval = interval
        self.max_samples = max_samples
        # None: found in the samples when the session is made (see ``add_stem_marker``).
        self.start_call_stack = start_call_stack
        if description:
            self.description = description
        self.start_perf = _clock.perf_counter()

    @property
    def start_wall(self) -> float:
        """When the request started, as a ``time.time()`` (worked out when first asked)."""
        if self._start_wall is None:
            self._start_wall = _clock.time() - (_clock.perf_counter() - self.start_perf)
        return self._start_wall

    @property
    def url(self) -> str | None:
        """The link this profile will have if it is kept; None once it is discarded.

        Set by the core (or made on first read by ``url_factory``), read by
        otelprof_middleware.logging so the request's log records can carry it.
        """
        factory = self.url_factory
        if factory is not None and self._url is None:
            self.url_factory = None
            try:
                self._url = factory()
            except Exception as exc:  # counted and logged as the eager link was
                log_failure("profiler.link", exc)
        return self._url

    @url.setter
    def url(self, value: str | None) -> None:
        self._url = value
        self.url_factory = None

    def add(self, stack: list[str], seconds: float, *, waiting: bool = False) -> None:
        """Record ``seconds`` spent in ``stack`` (root first); ``waiting``: at an await.

        Always-on: a stack equal to the last record's extends that record. A thread that
        sits in one call through many ticks (a WSGI stream's ``time.sleep`` between two
        events, a blocking read) keeps one record, not one per tick: a Flask stream
        sleeping between events had about 190 records a second at the 5 ms interval, and
        reached ``max_samples`` (dropping the rest of its samples) after 105 s.
        """
        records = self.records
        if self.continuous and not waiting and records:
            last_stack, last_seconds = records[-1]
            if last_stack is stack or last_stack == stack:
                records[-1] = (last_stack, last_seconds + seconds)
                self.own_seconds += seconds
                self.samples += 1
                return
        if len(records) >= self.max_samples:
            self.dropped_samples += 1
            return
        self.samples += 1
        if waiting:
            self.records.append(([*stack, AWAIT_FRAME_IDENTIFIER], seconds))
        else:
            self.records.append((stack, seconds))
            self.own_seconds += seconds

    def add_wait(self, stack: list[str], seconds: float) -> None:
        """Record ``seconds`` of waiting at ``stack`` (which ends with ``[await]``).

        Consecutive waits at the same stack object extend one record, so a request that
        waits through many sampler ticks keeps one record, not one per tick.
        """
        records = self.records
        if records:
            last_stack, last_seconds = records[-1]
            if last_stack is stack:
                records[-1] = (stack, last_seconds + seconds)
                self.samples += 1
                return
        if len(records) >= self.max_samples:
            self.dropped_samples += 1
            return
        self.samples += 1
        records.append((stack, seconds))

    def add_worker(self, stack: list[str], seconds: float) -> None:
        """Record worker-thread time; the loop's next ``[await]`` shrinks by as much."""
        self.add(stack, seconds)
        self.worker_seconds += seconds

    def wait_beyond_jobs(self, waited: float) -> float:
        """The part of a wait of ``waited`` seconds that the request's worker-thread jobs
        have not recorded since the last call (their tally restarts: concurrent jobs may
        exceed the wait, and the excess is never carried over)."""
        covered, self.worker_seconds = self.worker_seconds, 0.0
        return waited - min(waited, covered)

    def suspend(self, stack: list[str], now: float) -> None:
        """The request was switched out at ``now``; ``stack`` is where it waits."""
        self.suspended_at = now
        self.suspended_stack = stack

    def resume(self, now: float) -> None:
        """The request runs again: the time away is an ``[await]`` under its waiting stack."""
        if self.suspended_at is not None and self.suspended_stack is not None:
            # Worker threads' samples already account for part of this wait.
            waited = self.wait_beyond_jobs(now - self.suspended_at)
            if waited > 0:
                self.add(self.suspended_stack, waited, waiting=True)
        self.suspended_at = None
        self.suspended_stack = None

    def to_session(self, duration: float) -> Session:
        """Freeze the samples into a pyinstrument session (call after ``closed`` is set)."""
        description = self.description
        if self.dropped_samples:
            description += f" (sample cap reached: {self.dropped_samples} samples dropped)"
        return Session(
            frame_records=self.records,
            start_time=self.start_wall,
            duration=duration,
            min_interval=self.interval,
            max_interval=self.interval,
            sample_count=self.samples,
            start_call_stack=(
                self.start_call_stack
                if self.start_call_stack is not None
                else _stem_of(self.records)
            ),
            target_description=description,
            cpu_time=self.own_seconds,
            sys_path=list(sys.path),
            sys_prefixes=list(_SYS_PREFIXES),
        )


_STEM_MARKERS: list[tuple[str, str]] = []


def add_stem_marker(code: types.CodeType) -> None:
    """Frames of ``code`` start a request's profile (an adapter's entry point).

    A profile recorded without a start stack (always-on) is trimmed down to the caller
    of the first such frame in its samples, as pyinstrument trims down to the caller
    of ``Profiler.start()``.
    """
    head = code_head(code)
    marker = (head, head + ATTRIBUTES_SEP)
    if marker not in _STEM_MARKERS:
        _STEM_MARKERS.append(marker)


def _stem_of(records: list[FrameRecord]) -> list[str]:
    """The frames below the adapter, from the first whole sample that has it.

    Whole: rooted at a thread frame. A wait seen before the sampler knew the loop's own
    frames starts at the task's outer coroutine instead, which would not match the tree
    of the other samples. Without the adapter in any sample, the first sample's root
    frame: pyinstrument's stem trimming needs at least one frame (it pops the first
    unconditionally), and one trims nothing.
    """
    fallback: list[str] | None = None
    for stack, _ in records:
        for index, identifier in enumerate(stack):
            if not _is_stem_marker(identifier):
                continue
            if index and is_thread_root(stack[0]):
                return stack[:index]
            if index and fallback is None:
                fallback = stack[:index]
            break
    if fallback is not None:
        return fallback
    return records[0][0][:1] if records and records[0][0] else [NO_SAMPLES]


def _is_stem_marker(identifier: str) -> bool:
    for head, head_with_attributes in _STEM_MARKERS:
        if identifier == head or identifier.startswith(head_with_attributes):
            return True
    return False
