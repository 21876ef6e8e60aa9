"""The ProfileStore protocol every backend implements, and the checks they share."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol, runtime_checkable
from urllib.parse import unquote_plus, urlsplit, urlunsplit

from .._record import ProfileRecord, ProfileSummary

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PROFILES",
    "ORDERS",
    "ProfileStore",
    "check_bounds",
    "check_fits",
    "check_list_args",
    "matches",
    "redact_url",
]

DEFAULT_MAX_PROFILES = 1000
"""Default count bound of every store (``OTELPROF_STORE_MAX_PROFILES``)."""

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
"""Default payload-bytes bound of every store (``OTELPROF_STORE_MAX_BYTES``)."""

ORDERS = ("newest", "slowest")
"""The orders :meth:`ProfileStore.list` knows."""


@runtime_checkable
class ProfileStore(Protocol):
    """Where kept profiles live. Implementations must be thread-safe.

    Ids passed in are already validated by callers (lowercase hex, 32/16 chars).
    Every method may raise on backend failure; callers wrap them in ``fail_open``.
    The background writer calls :meth:`put_many` for its batches; it still falls back
    to :meth:`put` per record for a store written before ``put_many`` was part of the
    protocol.

    A new backend: a module in ``otelprof_middleware/stores/`` with a class that has
    these methods, calling :func:`check_bounds` in its constructor, :func:`check_fits`
    before a write and :func:`check_list_args` in ``list``, and deriving what it stores
    from ``otelprof_middleware._record.SUMMARY_FIELDS``; then a scheme in
    :func:`~otelprof_middleware.stores.open_store`.
    """

    @property
    def url(self) -> str:
        """The store's URL (``memory://``, ``sqlite:///...``)."""

    def put(self, record: ProfileRecord) -> None:
        """Store ``record`` (replacing one with the same trace and span id), then evict
        the oldest records until the store is within its count and byte bounds."""

    def put_many(self, records: Sequence[ProfileRecord]) -> None:
        """:meth:`put` for several records as one write (one transaction or script),
        evicting once after them. A record larger than the store's ``max_bytes``
        raises ``ValueError`` and nothing is written."""

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


def matches(
    summary: ProfileSummary,
    route: str | None,
    min_duration_ms: float | None,
    since: float | None,
    until: float | None,
) -> bool:
    """True when ``summary`` passes :meth:`ProfileStore.list`'s filters (for stores that
    filter in Python)."""
    return (
        (route is None or summary.route == route)
        and (min_duration_ms is None or summary.duration_ms >= min_duration_ms)
        and (since is None or summary.start_time >= since)
        and (until is None or summary.start_time <= until)
    )


# Query parameters that carry a secret: redis-py passes every query parameter it does not
# parse itself to the connection, so ``?password=`` logs in and ``?ssl_password=``
# unlocks the TLS key, as the URL's ``user:password@`` part does.
_SECRET_QUERY_PARAMETERS = frozenset({"password", "ssl_password"})


# The password of a URL's user part, for a URL urlsplit refuses: "//user:" kept.
_USER_PASSWORD = re.compile(r"(//[^/@:]*:)[^/]*@")


def redact_url(url: str) -> str:
    """``url`` with its passwords replaced by ``***``, for messages and ``store.url``.

    The password of the user part and the value of a ``password`` or ``ssl_password``
    query parameter are replaced.
    """
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # it does not split (a malformed IPv6 host): hide the user part's
        return _USER_PASSWORD.sub(r"\1***@", url)
    redacted = parts
    if password:
        user = parts.username or ""
        host = parts.netloc.rpartition("@")[2]
        redacted = redacted._replace(netloc=f"{user}:***@{host}")
    if parts.query:
        redacted = redacted._replace(query=_redact_query(parts.query))
    # Rebuilt only when something was hidden: urlunsplit drops the empty authority of
    # sqlite:///path and sqlite:////path (one slash fewer: another path).
    return url if redacted == parts else urlunsplit(redacted)


def _redact_query(query: str) -> str:
    """``query`` with the values of its secret parameters replaced by ``***``."""
    fields = []
    for field in query.split("&"):
        name, sep, _ = field.partition("=")
        if sep and unquote_plus(name).strip().lower() in _SECRET_QUERY_PARAMETERS:
            field = f"{name}=***"
        fields.append(field)
    return "&".join(fields)
