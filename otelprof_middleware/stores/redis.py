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

:class:`RedisStore` keeps the store's methods. ``_redis_client.py`` reads the URL and
makes the calls (closed check, fail fast after a timeout), ``_redis_format.py`` holds the
Lua scripts and the hash encoding, and ``_redis_read.py`` turns replies into records
and walks the sorted sets for ``list``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, cast

from .._record import ProfileRecord, ProfileSummary
from . import _redis_format as fmt
from . import _redis_read as read
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
    RETRY_AFTER_TIMEOUT_SECONDS,
    Connection,
    settings,
)

if TYPE_CHECKING:
    from redis.commands.core import Script

# The defaults, RETRY_AFTER_TIMEOUT_SECONDS and redact_url are re-exported: they were
# defined here, and the CLI and users import them from here.
__all__ = [
    "DEFAULT_PREFIX",
    "DEFAULT_SOCKET_TIMEOUT",
    "DEFAULT_TTL_SECONDS",
    "RETRY_AFTER_TIMEOUT_SECONDS",
    "RedisStore",
    "redact_url",
]


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
        self._connection = Connection(url, chosen)
        self._client = self._connection.client
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
        self._connection.check_open()
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
        self._connection.run(self._put_script, args=args)

    def get(self, trace_id: str, span_id: str | None = None) -> Sequence[ProfileRecord]:
        """The records of ``trace_id`` (only ``span_id``'s when given), newest first."""
        self._connection.check_open()
        if span_id is not None:
            ids = [f"{trace_id}:{span_id}"]
        else:
            spans = cast(
                "list[bytes]",
                self._connection.run(self._client.zrange, self._key("t:", trace_id), 0, -1),
            )
            ids = [f"{trace_id}:{_text(span)}" for span in spans]
        if not ids:
            return []
        pipe = self._client.pipeline(transaction=False)
        for id_ in ids:
            pipe.hmget(self._key("p:", id_), [*fmt.HASH_FIELDS])
            pipe.get(self._key("b:", id_))
        replies = cast("list[Any]", self._connection.run(pipe.execute))
        records, gone = read.records(ids, replies, listed=span_id is None)
        if gone:
            self._forget(gone)
        return records

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
        self._connection.check_open()
        if limit == 0:
            return []
        plan = read.list_plan(self.prefix, limit, route, min_duration_ms, since, until, order)

        def page(offset: int) -> list[Any]:
            args = [self.prefix, plan.key, plan.high, plan.low, offset, plan.batch]
            return cast("list[Any]", self._connection.run(self._page_script, args=args))

        found, gone = read.walk(
            page, plan.batch, limit, lambda s: matches(s, route, min_duration_ms, since, until)
        )
        if gone:
            self._forget(gone)
        return read.ranked(found, order, limit)

    def delete(self, trace_id: str, span_id: str | None = None) -> int:
        """Delete the records of ``trace_id`` (only ``span_id``'s when given).

        Returns:
            How many records were deleted.
        """
        self._connection.check_open()
        deleted = self._connection.run(
            self._delete_script, args=[self.prefix, trace_id, span_id or ""]
        )
        return int(deleted)

    def stats(self) -> tuple[int, int]:
        """``(count, total payload bytes)`` currently stored (expired entries purged
        first)."""
        self._connection.check_open()
        count, total = self._connection.run(self._stats_script, args=[self.prefix])
        return int(count), int(total)

    def close(self) -> None:
        """Close the connection pool. Safe to call twice; other methods then raise
        ``RuntimeError``."""
        self._connection.close()

    # -- helpers ---------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return self.prefix + "".join(parts)

    def _forget(self, ids: Iterable[str]) -> None:
        """Remove what is left of ``ids`` whose hash or payload is gone (expired or
        evicted).

        Best effort: a reader that may not write (``otelprof serve`` on a read-only
        replica, or as an ACL user without write commands) gets ``READONLY`` or
        ``NOPERM`` here, and still answers with what it read; the next write removes
        the entries.
        """
        with contextlib.suppress(self._connection.redis.ResponseError):
            self._connection.run(self._forget_script, args=[self.prefix, *ids])


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value
