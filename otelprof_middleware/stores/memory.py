"""A bounded in-process store, for tests and single-process development."""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Sequence

from .._fork import renew_locks_in_children
from .._record import ProfileRecord, ProfileSummary
from ._base import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PROFILES,
    ORDERS,
    check_bounds,
    check_fits,
    check_list_args,
    matches,
)

# The defaults and ORDERS are re-exported: they were defined here before ``_base``.
__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_PROFILES", "ORDERS", "MemoryStore"]

_Key = tuple[str, str]


class MemoryStore:
    """Keeps profiles in a dict in this process; lost when the process exits.

    Thread-safe (one lock). Bounded: after each :meth:`put` the oldest records (by
    ``start_time``, then insertion order) are evicted until at most ``max_profiles``
    records and ``max_bytes`` payload bytes remain. Not shared between worker
    processes: use the SQLite store for that.

    Args:
        max_profiles: keep at most this many records (``OTELPROF_STORE_MAX_PROFILES``,
            default ``1000``).
        max_bytes: keep at most this many compressed payload bytes
            (``OTELPROF_STORE_MAX_BYTES``, default 64 MiB). A single record larger
            than this is refused with ``ValueError`` instead of emptying the store.

    Example::

        store = MemoryStore(max_profiles=100)
        store.put(record)
        [again] = store.get(record.summary.trace_id)
    """

    url = "memory://"

    def __init__(
        self,
        max_profiles: int = DEFAULT_MAX_PROFILES,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        check_bounds(max_profiles, max_bytes)
        self.max_profiles = max_profiles
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        # key -> (insertion sequence number, record)
        self._records: dict[_Key, tuple[int, ProfileRecord]] = {}
        # Min-heap of (start_time, seq, key) for eviction. Entries whose seq no longer
        # matches self._records[key] are stale (replaced or deleted) and skipped.
        self._heap: list[tuple[float, int, _Key]] = []
        self._seq = itertools.count()
        self._bytes = 0
        renew_locks_in_children(self)

    def renew_locks(self) -> None:
        """In a forked child (a ``--preload`` worker whose master kept profiles): the
        parent's writer thread may have held the lock mid-write."""
        self._lock = threading.Lock()

    def put(self, record: ProfileRecord) -> None:
        """Store ``record`` (replacing one with the same ids), then evict the oldest.

        Raises:
            ValueError: the record alone is larger than ``max_bytes``.
        """
        self.put_many([record])

    def put_many(self, records: Sequence[ProfileRecord]) -> None:
        """:meth:`put` for several records under one lock, evicting once after them.

        Raises:
            ValueError: a record alone is larger than ``max_bytes`` (nothing is stored).
        """
        for record in records:
            check_fits(record, self.max_bytes)
        with self._lock:
            for record in records:
                summary = record.summary
                key = (summary.trace_id, summary.span_id)
                old = self._records.pop(key, None)
                if old is not None:
                    self._bytes -= old[1].size
                seq = next(self._seq)
                self._records[key] = (seq, record)
                self._bytes += record.size
                heapq.heappush(self._heap, (summary.start_time, seq, key))
            self._evict()
            self._compact()

    def _evict(self) -> None:
        """Drop the oldest records until within bounds. Caller holds the lock."""
        while len(self._records) > self.max_profiles or self._bytes > self.max_bytes:
            _, seq, key = heapq.heappop(self._heap)
            entry = self._records.get(key)
            if entry is None or entry[0] != seq:
                continue  # stale heap entry
            del self._records[key]
            self._bytes -= entry[1].size

    def _compact(self) -> None:
        """Rebuild the heap when stale entries outnumber live ones. Caller holds the lock."""
        if len(self._heap) > 2 * len(self._records) + 64:
            self._heap = [
                (record.summary.start_time, seq, key)
                for key, (seq, record) in self._records.items()
            ]
            heapq.heapify(self._heap)

    def get(self, trace_id: str, span_id: str | None = None) -> Sequence[ProfileRecord]:
        """The records of ``trace_id`` (only ``span_id``'s when given), newest first."""
        with self._lock:
            if span_id is not None:
                entry = self._records.get((trace_id, span_id))
                return [entry[1]] if entry is not None else []
            found = [entry for key, entry in self._records.items() if key[0] == trace_id]
        found.sort(key=lambda e: (e[1].summary.start_time, e[0]), reverse=True)
        return [record for _, record in found]

    def list(
        self,
        *,
        limit: int = 100,
        route: str | None = None,
        min_duration_ms: float | None = None,
        since: float | None = None,
        until: float | None = None,
        order: str = "newest",
    ) -> Sequence[ProfileSummary]:
        """Summaries matching the filters, ``"newest"`` or ``"slowest"`` first.

        Args:
            limit: at most this many summaries (``0`` gives none).
            route: only this route template (exact match).
            min_duration_ms: only requests that took at least this long.
            since: only ``start_time >= since`` (epoch seconds).
            until: only ``start_time <= until`` (epoch seconds).
            order: ``"newest"`` (start time, descending) or ``"slowest"``
                (duration, descending; ties newest first).

        Returns:
            The matching summaries.

        Raises:
            ValueError: ``order`` is unknown or ``limit`` is negative.
        """
        check_list_args(limit, order)
        with self._lock:
            entries = list(self._records.values())
        found = [
            (seq, record.summary)
            for seq, record in entries
            if matches(record.summary, route, min_duration_ms, since, until)
        ]
        if order == "slowest":
            found.sort(key=lambda m: (m[1].duration_ms, m[1].start_time, m[0]), reverse=True)
        else:
            found.sort(key=lambda m: (m[1].start_time, m[0]), reverse=True)
        return [s for _, s in found[:limit]]

    def delete(self, trace_id: str, span_id: str | None = None) -> int:
        """Delete the records of ``trace_id`` (only ``span_id``'s when given).

        Returns:
            How many records were deleted.
        """
        with self._lock:
            if span_id is not None:
                keys = [(trace_id, span_id)] if (trace_id, span_id) in self._records else []
            else:
                keys = [key for key in self._records if key[0] == trace_id]
            for key in keys:
                _, record = self._records.pop(key)
                self._bytes -= record.size
            self._compact()
            return len(keys)

    def stats(self) -> tuple[int, int]:
        """``(count, total payload bytes)`` currently stored."""
        with self._lock:
            return len(self._records), self._bytes

    def close(self) -> None:
        """Nothing to release; the records stay readable until the store is dropped."""
