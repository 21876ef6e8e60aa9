"""A bounded in-process store, for tests and single-process development."""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Sequence

from .._record import ProfileRecord, ProfileSummary

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_PROFILES", "MemoryStore"]

DEFAULT_MAX_PROFILES = 1000
"""Default count bound of every store (``OTELPROF_STORE_MAX_PROFILES``)."""

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
"""Default payload-bytes bound of every store (``OTELPROF_STORE_MAX_BYTES``)."""

ORDERS = ("newest", "slowest")

_Key = tuple[str, str]


# The helpers below are shared with the SQLite store (private to ``stores``).
def check_bounds(max_profiles: int, max_bytes: int) -> None:
    """Raise ``ValueError`` unless both bounds are positive ints."""
    for name, value in (("max_profiles", max_profiles), ("max_bytes", max_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_list_args(limit: int, order: str) -> None:
    """Raise ``ValueError`` on a negative ``limit`` or an unknown ``order``."""
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit!r}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")


def check_fits(record: ProfileRecord, max_bytes: int) -> None:
    """Raise ``ValueError`` when ``record`` alone exceeds ``max_bytes``.

    Storing it would evict everything else and then the record itself.
    """
    if record.size > max_bytes:
        raise ValueError(
            f"profile of {record.size} bytes exceeds the store's max_bytes ({max_bytes})"
        )


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

    def put(self, record: ProfileRecord) -> None:
        """Store ``record`` (replacing one with the same ids), then evict the oldest.

        Raises:
            ValueError: the record alone is larger than ``max_bytes``.
        """
        check_fits(record, self.max_bytes)
        summary = record.summary
        key = (summary.trace_id, summary.span_id)
        with self._lock:
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
        matches: list[tuple[int, ProfileSummary]] = []
        for seq, record in entries:
            s = record.summary
            if route is not None and s.route != route:
                continue
            if min_duration_ms is not None and s.duration_ms < min_duration_ms:
                continue
            if since is not None and s.start_time < since:
                continue
            if until is not None and s.start_time > until:
                continue
            matches.append((seq, s))
        if order == "slowest":
            matches.sort(key=lambda m: (m[1].duration_ms, m[1].start_time, m[0]), reverse=True)
        else:
            matches.sort(key=lambda m: (m[1].start_time, m[0]), reverse=True)
        return [s for _, s in matches[:limit]]

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
