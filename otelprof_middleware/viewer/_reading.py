"""Reading the store for the viewer: a failing store is a 503, a corrupt profile a 422,
each logged and counted here, once for every page."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from pyinstrument.session import Session

from .._failsafe import log_failure
from .._record import ProfileRecord, ProfileSummary
from ..stores._base import ProfileStore
from ._http import Abort

__all__ = ["StoreReader", "decoded"]

# How many of a route's recent profiles a diff looks through for those taken in the
# request's own mode (the hook and the always-on sampler see different frames).
_MODE_SCAN = 1000

_T = TypeVar("_T")


class StoreReader:
    """The store as the viewer reads it: whole lists, and :class:`Abort` on failure.

    Args:
        open_store: returns the store. Called at the first read (so nothing is opened
            before a page needs it); while it raises, each read is a 503 and the next
            read calls it again; the store it returns is kept.
    """

    def __init__(self, open_store: Callable[[], ProfileStore]) -> None:
        self._open_store = open_store
        self._opened: ProfileStore | None = None
        self._lock = threading.Lock()

    def _store(self) -> ProfileStore:
        """The store, opened at the first call (raises what opening it raised)."""
        store = self._opened
        if store is None:
            with self._lock:
                store = self._opened
                if store is None:
                    store = self._opened = self._open_store()
        return store

    def _read(self, read: Callable[[], Sequence[_T]]) -> list[_T]:
        try:
            return list(read())
        except Exception as exc:
            log_failure("viewer.store", exc)
            raise Abort(503, "profile store unavailable.\n") from None

    def summaries(
        self,
        *,
        limit: int,
        route: str | None = None,
        min_duration_ms: float | None = None,
        order: str = "newest",
    ) -> list[ProfileSummary]:
        """The store's ``list``; 503 when it fails."""
        return self._read(
            lambda: self._store().list(
                limit=limit, route=route, min_duration_ms=min_duration_ms, order=order
            )
        )

    def get(self, trace_id: str, span_id: str | None = None) -> list[ProfileRecord]:
        """The store's ``get``; 503 when it fails."""
        return self._read(lambda: self._store().get(trace_id, span_id))

    def profiles(self, trace_id: str, span_id: str | None) -> list[ProfileRecord]:
        """The profiles of ``trace_id`` (and ``span_id``, if given); 503 when it fails."""
        return self._read(
            lambda: [
                record
                for record in self._store().get(trace_id, span_id)
                if record.summary.trace_id == trace_id
                and (span_id is None or record.summary.span_id == span_id)
            ]
        )

    def route_summaries(
        self,
        route: str,
        limit: int,
        exclude: ProfileSummary | None = None,
        mode: str | None = None,
    ) -> list[ProfileSummary]:
        """The ``limit`` most recent profiles of ``route`` (the baseline), ``exclude`` aside;
        with ``mode``, only those taken in that mode (among the route's recent profiles)."""
        scan = limit + 1 if mode is None else max(limit + 1, _MODE_SCAN)
        summaries = self.summaries(route=route, limit=scan)
        return self._read(
            lambda: [
                s
                for s in summaries
                if s.route == route
                and (mode is None or s.mode == mode)
                and (
                    exclude is None
                    or (s.trace_id, s.span_id) != (exclude.trace_id, exclude.span_id)
                )
            ][:limit]
        )

    def route_sessions(
        self,
        route: str,
        limit: int,
        exclude: ProfileSummary | None = None,
        mode: str | None = None,
    ) -> list[Session]:
        """The sessions of :meth:`route_summaries`, decoded; 422 when one is corrupt."""
        summaries = self.route_summaries(route, limit, exclude, mode)
        records = self._read(
            lambda: [r for s in summaries for r in self._store().get(s.trace_id, s.span_id)]
        )
        try:
            return [record.session() for record in records]
        except Exception as exc:
            log_failure("viewer.decode", exc)
            raise Abort(422, "a stored profile is corrupt; the error was logged.\n") from None


def decoded(record: ProfileRecord) -> Session:
    """The record's session; 422 when it cannot be decoded."""
    try:
        return record.session()
    except Exception as exc:
        log_failure("viewer.decode", exc)
        raise Abort(
            422, "the stored profile is corrupt and cannot be shown; the error was logged.\n"
        ) from None
