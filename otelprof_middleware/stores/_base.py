"""The ProfileStore protocol every backend implements."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from .._record import ProfileRecord, ProfileSummary

__all__ = ["ProfileStore"]


@runtime_checkable
class ProfileStore(Protocol):
    """Where kept profiles live. Implementations must be thread-safe.

    Ids passed in are already validated by callers (lowercase hex, 32/16 chars).
    A store may also offer ``put_many(records)``: the background writer then stores each
    batch in one call (one transaction for SQLite); without it, it calls ``put`` per record.
    Every method may raise on backend failure; callers wrap them in ``fail_open``.
    """

    @property
    def url(self) -> str:
        """The store's URL (``memory://``, ``sqlite:///...``)."""

    def put(self, record: ProfileRecord) -> None:
        """Store ``record`` (replacing one with the same trace and span id), then evict
        the oldest records until the store is within its count and byte bounds."""

    def get(self, trace_id: str, span_id: str | None = None) -> Sequence[ProfileRecord]:
        """The records of ``trace_id`` (only ``span_id``'s when given), newest first."""

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
        """Summaries matching the filters. ``order`` is ``"newest"`` (by start time,
        descending) or ``"slowest"`` (by duration, descending). ``since``/``until``
        bound ``start_time`` (epoch seconds, inclusive)."""

    def delete(self, trace_id: str, span_id: str | None = None) -> int:
        """Delete the records of ``trace_id`` (only ``span_id``'s when given); return how many."""

    def stats(self) -> tuple[int, int]:
        """``(count, total payload bytes)`` currently stored."""

    def close(self) -> None:
        """Release connections and files. Safe to call twice."""
