"""Background writer: serialisation and store writes happen off the request path.

The queue is bounded, in profiles (``writer_queue_size``) and in their samples
(:data:`~.._background.QUEUED_SAMPLES`); when it is full the profile is dropped and
counted, the request never waits. The thread (:class:`BatchingThread`) starts on first
use and again in a forked child (gunicorn ``--preload``).
"""

from __future__ import annotations

from collections.abc import Callable

from pyinstrument.session import Session

from .._background import QUEUED_SAMPLES, BatchingThread
from .._failsafe import count, fail_open, log_event, log_failure, logger
from .._record import ProfileRecord, ProfileSummary
from ..stores._base import ProfileStore

__all__ = ["ProfileWriter"]

BATCH_SIZE = 64


class ProfileWriter(BatchingThread):
    """Hands kept profiles to a store on a daemon thread.

    Args:
        get_store: returns the store to write to (may raise; the failure is counted).
        queue_size: profiles that may wait; more are dropped (counter ``dropped.queue_full``),
            as are profiles beyond ``queued_samples`` samples in all.
        queued_samples: most samples the waiting profiles may hold in all (a profile
            over it is taken when none waits).
    """

    def __init__(
        self,
        get_store: Callable[[], ProfileStore],
        queue_size: int,
        *,
        queued_samples: int = QUEUED_SAMPLES,
    ) -> None:
        super().__init__("otelprof-writer", queue_size, BATCH_SIZE, queued_samples=queued_samples)
        self._get_store = get_store

    def submit(self, summary: ProfileSummary, session: Session) -> bool:
        """Queue a profile for writing; never blocks. Returns False when it was dropped."""
        if self.offer((summary, session)):
            return True
        count("dropped.queue_full")
        log_event(
            "writer.queue_full",
            "otelprof: the profile writer's queue is full (writer_queue_size=%d profiles, "
            "or %d sample records in all: the store is slow or unreachable); profiles are "
            "dropped and counted in dropped.queue_full",
            self._queue_size,
            self._queued_samples,
        )
        return False

    def _samples(self, item: object) -> int:
        assert isinstance(item, tuple)
        session: Session = item[1]
        return len(session.frame_records)

    def note_unwritten(self, waited: float) -> int:
        """At shutdown, after a flush that did not end within ``waited`` seconds (a slow
        or locked store): count (``unwritten.shutdown``) and log the profiles not written.

        They stay queued: if the process goes on, they are still written; if it exits
        now (uvicorn re-raises SIGTERM right after the lifespan), they are lost.

        Returns:
            The number of profiles still queued.
        """
        left = len(self.queued_items())
        if left:
            count("unwritten.shutdown", left)
            logger.warning(
                "otelprof: at shutdown, %d profiles were still waiting for the store after "
                "%g s (a slow or locked store): lost if the process exits now, counted as "
                "unwritten.shutdown",
                left,
                waited,
            )
        return left

    def _process(self, items: list[object]) -> None:
        """Serialise a batch and store it in one transaction where the store can."""
        records: list[ProfileRecord] = []
        for item in items:
            assert isinstance(item, tuple)
            summary, session = item
            with fail_open("store.put"):
                records.append(ProfileRecord.from_session(summary, session))
        if records:
            self._write(records)

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
