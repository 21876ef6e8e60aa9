"""A daemon thread fed by a bounded queue, working in batches: the writer and exporters.

The thread starts on first use and again in a forked child (gunicorn ``--preload``),
since threads do not survive ``fork()``. It exits after ``IDLE_SECONDS`` with nothing to
do and starts again with the next item, so a process that builds many apps (a test
suite) does not keep an idle thread per app. ``offer`` never blocks: a full queue
refuses the item, and the caller counts the drop. The queue is bounded twice: by its
number of items, and by the samples of the profiles it holds (:data:`QUEUED_SAMPLES`), so
that a stalled store or receiver with long profiles waiting cannot take the process's
memory (256 profiles at ``max_samples`` would be about 1.9 GB).

The thread works in a context of its own, with OpenTelemetry instrumentation suppressed:
the exporters' HTTP posts and the store's queries are the profiler's plumbing, not the
app's work. A thread started by a request would otherwise run in that request's context
when the threading instrumentation (which ``opentelemetry-bootstrap`` installs) copies it
into new threads, and every later post would be a client span in that request's trace.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import queue
import sys
import threading

from opentelemetry import context as otel_context
from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY

from ._fork import renew_locks_in_children

__all__ = ["BatchingThread"]

_STOP = object()
QUEUED_SAMPLES = 160_000
"""Most sample records (``frame_records``) the profiles waiting in one queue (and the
batch being processed) may hold in all: about 60 MB (a record of a 30-frame stack takes
about 375 bytes in memory), room for 8 profiles at the default ``max_samples`` or 800 of
a second each. A profile larger than that is still taken when the queue holds no other."""
IDLE_SECONDS = 2.0
"""An idle thread exits after this long: a test suite that builds an app per test (each
app's middleware has its own writer) keeps a thread only for the apps of the last moment
(30 s kept a thousand idle threads alive in a suite of a thousand short tests). Starting
one again costs a kept profile's request about 0.1 ms."""
_exiting = False


def _note_exit() -> None:
    global _exiting
    _exiting = True


# Registered at import, so it runs after every close() registered later (atexit is LIFO):
# the threads drain first, then nothing starts a new one.
atexit.register(_note_exit)


class BatchingThread:
    """Runs :meth:`_process` on batches of offered items, on its own daemon thread.

    Args:
        name: the thread's name.
        queue_size: items that may wait; more are refused.
        batch_size: most items handed to one :meth:`_process` call.
        queued_samples: most samples (:meth:`_samples`) the items waiting and being
            processed may hold in all; an item over it is refused unless none is held.
    """

    def __init__(
        self,
        name: str,
        queue_size: int,
        batch_size: int,
        *,
        queued_samples: int = QUEUED_SAMPLES,
    ) -> None:
        self._thread_name = name
        self._queue_size = max(1, queue_size)
        self._batch_size = max(1, batch_size)
        self._queued_samples = max(1, queued_samples)
        self._held_samples = 0  # of the items queued or being processed
        self._held_lock = threading.Lock()
        self._lock = threading.Lock()
        self._pid = -1  # the process whose thread runs now; -1: none runs
        self._queue_pid = os.getpid()  # the process the queue belongs to
        self._queue: queue.Queue[object] = queue.Queue(self._queue_size)
        self._thread: threading.Thread | None = None
        renew_locks_in_children(self)

    def renew_locks(self) -> None:
        """In a forked child: the parent's thread may have held the lock (exiting idle)."""
        self._lock = threading.Lock()
        self._held_lock = threading.Lock()

    def offer(self, item: object) -> bool:
        """Queue ``item``; never blocks. False when the queue is full (in items or in
        samples) or the process exits."""
        if self._pid != os.getpid():
            if _exiting or sys.is_finalizing():
                # Starting a thread now can wait forever (CPython 3.11 blocks in
                # Thread.start() during finalization): a response closed at exit keeps
                # its profile only if the thread already runs.
                return False
            self._start()
        samples = self._samples(item)
        with self._held_lock:
            held = self._held_samples
            if held and held + samples > self._queued_samples:
                return False
            self._held_samples = held + samples
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._release(samples)
            return False
        return True

    def held_samples(self) -> int:
        """The samples the items waiting and being processed hold now."""
        return self._held_samples

    def _samples(self, item: object) -> int:
        """How many samples ``item`` holds (what :data:`QUEUED_SAMPLES` bounds); 0 here."""
        return 0

    def _release(self, samples: int) -> None:
        if samples:
            with self._held_lock:
                self._held_samples = max(0, self._held_samples - samples)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued item is processed (tests, shutdown). True if drained."""
        if self._pid != os.getpid():
            if self._queue_pid != os.getpid() or self._queue.empty():
                return True
            self._start()  # an item came in as the idle thread exited
        done = threading.Event()
        try:
            self._queue.put(done, timeout=timeout)
        except queue.Full:
            return False
        return done.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Process what is queued, then stop the thread."""
        thread = self._thread
        if thread is None or self._pid != os.getpid():
            return
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            return
        thread.join(timeout)
        with self._lock:
            self._thread = None
            if not thread.is_alive():
                self._pid = -1  # the next offer starts a thread again (else it only queued)

    def take_queued(self) -> list[object]:
        """Take the items still waiting: the thread will never process them.

        For a shutdown whose flush or close did not finish in time (a slow receiver):
        the caller counts what is left instead of losing it silently at exit. Waiters
        of :meth:`flush` are released; a stop asked by :meth:`close` stays asked.
        """
        taken: list[object] = []
        stop = False
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, threading.Event):
                item.set()
            elif item is _STOP:
                stop = True
            else:
                taken.append(item)
        self._release(sum(self._samples(item) for item in taken))
        if stop:
            self.ask_to_stop()
        return taken

    def queued_items(self) -> list[object]:
        """The items waiting now (not the one being processed), left in the queue."""
        with self._queue.mutex:
            items = list(self._queue.queue)
        return [i for i in items if i is not _STOP and not isinstance(i, threading.Event)]

    def ask_to_stop(self) -> None:
        """Tell the thread to stop after its current batch, without waiting."""
        with contextlib.suppress(queue.Full):  # full: close() refuses new items anyway
            self._queue.put_nowait(_STOP)

    def _process(self, items: list[object]) -> None:
        """Handle one batch (on the thread). Must count its own failures, never raise."""
        raise NotImplementedError

    def _thread_exit(self) -> None:
        """Release what the thread held (on the thread, as it stops)."""

    def _start(self) -> None:
        with self._lock:
            pid = os.getpid()
            if self._pid == pid:
                return
            if self._queue_pid != pid:  # a forked child starts afresh
                self._queue = queue.Queue(self._queue_size)
                self._queue_pid = pid
                self._held_samples = 0
            self._thread = threading.Thread(
                target=self._run, args=(self._queue,), name=self._thread_name, daemon=True
            )
            self._thread.start()
            self._pid = os.getpid()

    def _run(self, work: queue.Queue[object]) -> None:
        # A fresh context: no span of the request that started the thread, and no spans
        # for the thread's own I/O (instrumented httpx, redis, sqlite3).
        token = otel_context.attach(
            otel_context.set_value(_SUPPRESS_INSTRUMENTATION_KEY, True, otel_context.Context())
        )
        try:
            while True:
                try:
                    batch = [work.get(timeout=IDLE_SECONDS)]
                except queue.Empty:
                    with self._lock:
                        if work.empty():  # else an item just came in: carry on
                            self._pid = -1
                            self._thread = None
                            return
                    continue
                while len(batch) < self._batch_size:  # under load, many at once
                    try:
                        batch.append(work.get_nowait())
                    except queue.Empty:
                        break
                items = [
                    item
                    for item in batch
                    if item is not _STOP and not isinstance(item, threading.Event)
                ]
                if items:
                    try:
                        self._process(items)
                    finally:
                        self._release(sum(self._samples(item) for item in items))
                for item in batch:
                    if isinstance(item, threading.Event):
                        item.set()
                if any(item is _STOP for item in batch):
                    return
        finally:
            self._thread_exit()
            otel_context.detach(token)
