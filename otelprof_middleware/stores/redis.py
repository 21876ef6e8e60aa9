"""The store for many hosts: profiles in one Redis, with a TTL and count/byte bounds.

Every key starts with a prefix (default ``otelprof:``), so several services can share
one Redis. With ``P`` the prefix and ``ID`` = ``<trace_id>:<span_id>``:

========================== ======= ==================================================
key                        type    holds
========================== ======= ==================================================
``P p:ID``                 hash    the summary fields, ``size`` and ``seq``; expires
                                   after the TTL
``P b:ID``                 string  the payload (compressed session); expires with it
``P t:<trace_id>``         zset    span ids of one trace, scored by start time (for
                                   ``get(trace_id)``); expires with its last profile
``P idx:time``             zset    every ID, scored by start time (newest first,
                                   eviction of the oldest)
``P idx:duration``         zset    every ID, scored by duration (slowest first)
``P idx:expires``          zset    every ID, scored by its expiry (ms, Redis clock)
``P route:time:<route>``   zset    IDs of one route by start time
``P route:duration:<r>``   zset    IDs of one route by duration
``P entries``              hash    ID -> ``<size>:<route>``; ``HLEN`` is the count
``P bytes``                string  total payload bytes
``P seq``                  string  insertion counter (ties sort newest-inserted first)
========================== ======= ==================================================

Atomicity: every write (put and eviction, put_many, delete, purge of expired
entries) is one Lua script, so writers in many processes on many hosts keep the
indexes and totals consistent without locks. ``list`` walks one sorted set from
its high end, a page per read-only script call (never scans every key), and reads
only the summary hashes of the members it visits. Payloads live in their own keys,
so the summary hashes stay small (Redis keeps them compact) and are read alone.

Expiry: Redis drops an expired profile's keys by itself. Its index entries go at the
next write or ``stats`` (the ``idx:expires`` set says which are due), and any reader
that meets an index entry whose keys are gone (expired, or evicted by Redis under
``maxmemory``) skips it and removes it, with a script that re-checks first.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, cast

from .._record import ProfileRecord, ProfileSummary
from . import _redis_format as fmt
from ._base import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PROFILES,
    check_bounds,
    check_fits,
    check_list_args,
    matches,
    redact_url,
)
from ._redis_client import (
    DEFAULT_PREFIX,
    DEFAULT_SOCKET_TIMEOUT,
    DEFAULT_TTL_SECONDS,
    connect,
    settings,
)

if TYPE_CHECKING:
    from redis.commands.core import Script

# The defaults and redact_url are re-exported: they were defined here, and the CLI and
# users import them from here.
__all__ = [
    "DEFAULT_PREFIX",
    "DEFAULT_SOCKET_TIMEOUT",
    "DEFAULT_TTL_SECONDS",
    "RETRY_AFTER_TIMEOUT_SECONDS",
    "RedisStore",
    "redact_url",
]

RETRY_AFTER_TIMEOUT_SECONDS = 1.0
"""After a call timed out, calls fail at once for this long instead of waiting again."""


class RedisStore:
    """Profiles in one Redis, shared by every process on every host that points at it.

    ``OTELPROF_STORE=redis://host:6379/0`` (or ``rediss://`` for TLS). The URL may
    carry ``?ttl=<seconds>`` and ``?prefix=<key prefix>``; its other query
    parameters go to redis-py (``socket_timeout``, ``health_check_interval``, TLS
    options, ...). Needs redis-py (``pip install otelprof-middleware[redis]``),
    imported only when a store is created.

    Bounds: after each write the oldest profiles (by start time) are evicted until at
    most ``max_profiles`` profiles and ``max_bytes`` payload bytes remain; every
    profile also expires ``ttl_seconds`` after it was written. Writes, evictions and
    totals are atomic (Lua scripts), so many writers may share one Redis.

    Failures: a call on an unreachable Redis raises redis-py's ``ConnectionError`` or
    ``TimeoutError`` within about ``socket_timeout`` seconds (2 s; one quick retry when
    a connection breaks mid-call, none after a timeout); after a timeout, calls fail
    at once for ``RETRY_AFTER_TIMEOUT_SECONDS``. The middleware's writer
    and viewer catch and count these. The next call reconnects.

    Args:
        url: ``redis://[[user]:password@]host[:port][/db][?query]`` or ``rediss://...``.
        max_profiles: keep at most this many profiles (``OTELPROF_STORE_MAX_PROFILES``,
            default ``1000``).
        max_bytes: keep at most this many compressed payload bytes
            (``OTELPROF_STORE_MAX_BYTES``, default 64 MiB). A single record larger
            than this is refused with ``ValueError``.
        ttl_seconds: how long a profile lives (default: the URL's ``ttl``, else
            7 days).
        prefix: the start of every key (default: the URL's ``prefix``, else
            ``otelprof:``). Give each service sharing a Redis its own.

    Raises:
        ImportError: redis-py is not installed.
        ValueError: a bad URL, bound, TTL or prefix.

    Example::

        store = RedisStore("redis://cache.internal:6379/0?ttl=86400&prefix=api:")
        store.put(record)
        slowest = store.list(limit=20, order="slowest")
        store.close()
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        max_profiles: int = DEFAULT_MAX_PROFILES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        ttl_seconds: float | None = None,
        prefix: str | None = None,
    ) -> None:
        check_bounds(max_profiles, max_bytes)
        chosen = settings(url, ttl_seconds, prefix)
        self._redis, self._client = connect(url, chosen)
        self.url = chosen.url
        self.max_profiles = max_profiles
        self.max_bytes = max_bytes
        self.ttl_seconds = chosen.ttl_seconds
        self.prefix = chosen.prefix
        self._ttl_ms = max(1, round(chosen.ttl_seconds * 1000))
        self._put_script: Script = self._client.register_script(fmt.LUA_PUT)
        self._stats_script: Script = self._client.register_script(fmt.LUA_STATS)
        self._delete_script: Script = self._client.register_script(fmt.LUA_DELETE)
        self._forget_script: Script = self._client.register_script(fmt.LUA_FORGET)
        self._page_script: Script = self._client.register_script(fmt.LUA_PAGE)
        self._timed_out_until = 0.0
        self._closed = False
        self._close_lock = threading.Lock()

    # -- keys ------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return self.prefix + "".join(parts)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the profile store {self.url} is closed")

    def _run(self, call: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Make one Redis call, failing fast for a while after a timeout.

        A timeout means a hung server or a lost network, where every call would wait
        the full socket timeout: for ``RETRY_AFTER_TIMEOUT_SECONDS`` afterwards, calls
        raise ``redis.TimeoutError`` at once instead (a writer retrying a batch record
        by record, or a busy viewer, would otherwise wait once per call). Refused
        connections fail fast by themselves and are retried on every call.
        """
        self._check_open()
        if time.monotonic() < self._timed_out_until:
            raise self._redis.TimeoutError(
                f"Redis at {self.url} timed out less than {RETRY_AFTER_TIMEOUT_SECONDS:g} s "
                "ago; not waiting on it again yet"
            )
        try:
            return call(*args, **kwargs)
        except self._redis.TimeoutError:
            self._timed_out_until = time.monotonic() + RETRY_AFTER_TIMEOUT_SECONDS
            raise

    # -- ProfileStore ----------------------------------------------------------

    def put(self, record: ProfileRecord) -> None:
        """Store ``record`` (replacing one with the same ids), then evict the oldest.

        One Lua script: purge expired entries, write, index, evict; atomic for every
        writer sharing this Redis.

        Raises:
            ValueError: the record alone is larger than ``max_bytes``, or its ids are
                malformed.
            redis.RedisError: Redis is unreachable or failed.
        """
        self.put_many([record])

    def put_many(self, records: Sequence[ProfileRecord]) -> None:
        """:meth:`put` for several records in one script call (the writer's batches).

        Raises:
            ValueError: a record is larger than ``max_bytes`` or has malformed ids
                (nothing is written).
            redis.RedisError: Redis is unreachable or failed.
        """
        self._check_open()
        if not records:
            return
        args: list[str | bytes | int] = [
            self.prefix,
            self._ttl_ms,
            self.max_profiles,
            self.max_bytes,
        ]
        for record in records:
            check_fits(record, self.max_bytes)
            args += fmt.record_args(record)
        self._run(self._put_script, args=args)

    def get(self, trace_id: str, span_id: str | None = None) -> Sequence[ProfileRecord]:
        """The records of ``trace_id`` (only ``span_id``'s when given), newest first."""
        self._check_open()
        if span_id is not None:
            ids = [f"{trace_id}:{span_id}"]
        else:
            spans = cast(
                "list[bytes]", self._run(self._client.zrange, self._key("t:", trace_id), 0, -1)
            )
            ids = [f"{trace_id}:{_text(span)}" for span in spans]
        if not ids:
            return []
        pipe = self._client.pipeline(transaction=False)
        for id_ in ids:
            pipe.hmget(self._key("p:", id_), [*fmt.HASH_FIELDS])
            pipe.get(self._key("b:", id_))
        replies = cast("list[Any]", self._run(pipe.execute))
        found: list[tuple[float, int, ProfileRecord]] = []
        gone: list[str] = []
        for id_, values, payload in zip(ids, replies[::2], replies[1::2], strict=True):
            parsed = fmt.parse_summary(id_, values)
            if parsed is None or payload is None:
                # Listed by the trace's index, or half there: remove the rest.
                if span_id is None or parsed is not None or payload is not None:
                    gone.append(id_)
                continue
            summary, seq = parsed
            found.append((summary.start_time, seq, ProfileRecord(summary, bytes(payload))))
        if gone:
            self._forget(gone)
        found.sort(key=lambda item: (item[0], item[1]), reverse=True)
        return [record for _, _, record in found]

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

        Walks one sorted set from its high end, a page per round trip (a read-only
        script returns the members with their summary fields): by start time
        (``newest``) or by duration (``slowest``), the route's own sets when ``route``
        is given. The score range applies ``since``/``until`` or ``min_duration_ms``
        inside Redis; the other filter is checked on the visited summaries. Payloads
        are never read.

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
            redis.RedisError: Redis is unreachable or failed.
        """
        check_list_args(limit, order)
        self._check_open()
        if limit == 0:
            return []
        high: float | str = "+inf"
        low: float | str = "-inf"
        if order == "newest":
            key = self._key("route:time:", route) if route is not None else self._key("idx:time")
            if until is not None:
                high = until
            if since is not None:
                low = since
            post_filter = min_duration_ms is not None
        else:
            key = (
                self._key("route:duration:", route)
                if route is not None
                else self._key("idx:duration")
            )
            if min_duration_ms is not None:
                low = min_duration_ms
            post_filter = since is not None or until is not None
        # The score range applies the sort key's own filter; when no other filter is
        # left to check, every member matches and a page just above ``limit`` will do
        # (the margin catches ties at the boundary without another round trip).
        batch = min(max(2 * limit, 64) if post_filter else limit + 8, 1000)

        def page(offset: int) -> list[Any]:
            args = [self.prefix, key, high, low, offset, batch]
            return cast("list[Any]", self._run(self._page_script, args=args))

        found, gone = _walk(
            page, batch, limit, lambda s: matches(s, route, min_duration_ms, since, until)
        )
        if gone:
            self._forget(gone)
        if order == "slowest":
            found.sort(key=lambda m: (m[1].duration_ms, m[1].start_time, m[2]), reverse=True)
        else:
            found.sort(key=lambda m: (m[1].start_time, m[2]), reverse=True)
        return [summary for _, summary, _ in found[:limit]]

    def delete(self, trace_id: str, span_id: str | None = None) -> int:
        """Delete the records of ``trace_id`` (only ``span_id``'s when given).

        Returns:
            How many records were deleted.
        """
        self._check_open()
        deleted = self._run(self._delete_script, args=[self.prefix, trace_id, span_id or ""])
        return int(deleted)

    def stats(self) -> tuple[int, int]:
        """``(count, total payload bytes)`` currently stored (expired entries purged
        first)."""
        self._check_open()
        count, total = self._run(self._stats_script, args=[self.prefix])
        return int(count), int(total)

    def close(self) -> None:
        """Close the connection pool. Safe to call twice; other methods then raise
        ``RuntimeError``."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._client.close()

    # -- helpers ---------------------------------------------------------------

    def _forget(self, ids: Iterable[str]) -> None:
        """Remove what is left of ``ids`` whose hash or payload is gone (expired or
        evicted)."""
        self._run(self._forget_script, args=[self.prefix, *ids])


def _walk(
    page: Callable[[int], list[Any]],
    batch: int,
    limit: int,
    wanted: Callable[[ProfileSummary], bool],
) -> tuple[list[tuple[float, ProfileSummary, int]], list[str]]:
    """Walk a sorted set from its high end a page at a time: the ``(walk score, summary,
    seq)`` of the wanted members, down to the ``limit``-th one's score (ties included),
    and the IDs whose keys are gone."""
    found: list[tuple[float, ProfileSummary, int]] = []
    gone: list[str] = []
    seen: set[str] = set()
    boundary: float | None = None  # walk score of the limit-th match
    offset = 0
    while True:
        rows = page(offset)
        if not rows:
            break
        for row in rows:
            id_bytes, score_bytes, *values = bytes(row).split(fmt.SEP, len(fmt.HASH_FIELDS) + 1)
            id_, score = id_bytes.decode("ascii"), float(score_bytes)
            if boundary is not None and score < boundary:
                return found, gone
            if id_ in seen:
                continue
            seen.add(id_)
            parsed = fmt.parse_summary(id_, values)
            if parsed is None:
                gone.append(id_)
                continue
            summary, seq = parsed
            if not wanted(summary):
                continue
            found.append((score, summary, seq))
            if boundary is None and len(found) >= limit:
                boundary = score  # keep going through ties, then stop
        if len(rows) < batch:
            break
        offset += batch
    return found, gone


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value
