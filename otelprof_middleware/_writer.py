"""Background writer: serialisation and store writes happen off the request path.

The queue is bounded; when it is full the profile is dropped and counted, the request
never waits. The thread starts on first use and again in a forked child (gunicorn
``--preload``), since threads do not survive ``fork()``.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable

from pyinstrument.session import Session

from ._failsafe import count, fail_open, log_event, log_failure
from ._record import ProfileRecord, ProfileSummary
from .stores._base import ProfileStore

__all__ = ["ProfileWriter"]

_STOP = object()
BATCH_SIZE = 64


class ProfileWriter:
    """Hands kept profiles to a store on a daemon thread.

    Args:
        get_store: returns the store to write to (may raise; the failure is counted).
        queue_size: profiles that may wait; more are dropped (counter ``dropped.queue_full``).
    """

    def __init__(self, get_store: Callable[[], ProfileStore], queue_size: int) -> None:
        self._get_store = get_store
        self._queue_size = queue_size
        self._lock = threading.Lock()
        self._pid = -1
        self._queue: queue.Queue[object] = queue.Queue(queue_size)
        self._thread: threading.Thread | None = None

    def submit(self, summary: ProfileSummary, session: Session) -> bool:
        """Queue a profile for writing; never blocks. Returns False when it was dropped."""
        if self._pid != os.getpid():
            self._start()
        try:
            self._queue.put_nowait((summary, session))
        except queue.Full:
            count("dropped.queue_full")
            log_event(
                "writer.queue_full",
                "otelprof: the profile writer's queue is full (writer_queue_size=%d); "
                "profiles are dropped and counted in dropped.queue_full",
                self._queue_size,
            )
            return False
        return True

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued profile is written (tests, shutdown). True if drained."""
        if self._thread is None or self._pid != os.getpid():
            return True
        done = threading.Event()
        try:
            self._queue.put((done, None), timeout=timeout)
        except queue.Full:
            return False
        return done.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then stop the thread."""
        thread = self._thread
        if thread is None or self._pid != os.getpid():
            return
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            return
        thread.join(timeout)
        self._thread = None

    def _start(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                return
            self._queue = queue.Queue(self._queue_size)
            self._thread = threading.Thread(
                target=self._run, args=(self._queue,), name="otelprof-writer", daemon=True
            )
            self._thread.start()
            self._pid = os.getpid()

    def _run(self, work: queue.Queue[object]) -> None:
        while True:
            batch = [work.get()]
            while len(batch) < BATCH_SIZE:  # under load, one transaction for many
                try:
                    batch.append(work.get_nowait())
                except queue.Empty:
                    break
            records: list[ProfileRecord] = []
            flushed: list[threading.Event] = []
            stop = False
            for item in batch:
                if item is _STOP:
                    stop = True
                    continue
                assert isinstance(item, tuple)
                first, second = item
                if isinstance(first, threading.Event):
                    flushed.append(first)
                    continue
                with fail_open("store.put"):
                    records.append(ProfileRecord.from_session(first, second))
            if records:
                self._write(records)
            for event in flushed:
                event.set()
            if stop:
                return

    def _write(self, records: list[ProfileRecord]) -> None:
        """One ``put_many`` when the store has it, else ``put`` per record. Every profile
        is either written or counted in ``failed.store.put``."""
        try:
            store = self._get_store()
        except Exception as exc:  # the store cannot be opened: the whole batch is lost
            log_failure("store.put", exc)
            count("failed.store.put", len(records) - 1)
            return
        put_many = getattr(store, "put_many", None)
        if put_many is not None and len(records) > 1:
            try:
                put_many(records)
            except ValueError:
                pass  # one record does not fit: store the others one by one below
            except Exception as exc:  # locked, full, gone: retrying each would only wait
                log_failure("store.put", exc)
                count("failed.store.put", len(records) - 1)
                return
            else:
                count("written", len(records))
                return
        for record in records:
            with fail_open("store.put"):
                store.put(record)
                count("written")
