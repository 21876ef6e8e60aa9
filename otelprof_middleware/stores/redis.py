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

import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .._record import ProfileRecord, ProfileSummary
from .memory import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PROFILES,
    check_bounds,
    check_fits,
    check_list_args,
)

if TYPE_CHECKING:
    import redis as redis_py
    from redis.commands.core import Script

__all__ = [
    "DEFAULT_PREFIX",
    "DEFAULT_SOCKET_TIMEOUT",
    "DEFAULT_TTL_SECONDS",
    "RETRY_AFTER_TIMEOUT_SECONDS",
    "RedisStore",
    "redact_url",
]

DEFAULT_TTL_SECONDS = 7 * 24 * 3600
"""How long a profile lives in Redis unless evicted earlier (URL query ``?ttl=``)."""

DEFAULT_PREFIX = "otelprof:"
"""The start of every key (URL query ``?prefix=``)."""

DEFAULT_SOCKET_TIMEOUT = 2.0
"""Seconds a connect or a reply may take before the call raises (URL query
``?socket_timeout=`` / ``?socket_connect_timeout=`` override it)."""

RETRY_AFTER_TIMEOUT_SECONDS = 1.0
"""After a call timed out, calls fail at once for this long instead of waiting again."""

_PURGE_BATCH = 1000
_INSTALL_HINT = "the redis store needs redis-py: pip install otelprof-middleware[redis]"
_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_SPAN_ID = re.compile(r"[0-9a-f]{16}")
# ``route`` last: the page script joins the fields with _SEP, and only the last field
# may then contain _SEP itself. ``kept_reason`` and ``service`` are missing from hashes
# written by older versions: they read as "" (an HMGET nil, which the page script turns
# into "").
_SUMMARY_FIELDS = (
    "method",
    "status_code",
    "duration_ms",
    "start_time",
    "sample_count",
    "mode",
    "interval_ms",
    "kept_reason",
    "service",
    "seq",
    "route",
)
_SEP = b"\x1f"

# Shared head of every script. ARGV[1] is the key prefix. Keys are built inside the
# scripts, so this targets a standalone Redis (or a managed primary), not Cluster.
_LUA_COMMON = """
local P = ARGV[1]
local ENTRIES = P .. 'entries'
local BYTES = P .. 'bytes'
local TIME = P .. 'idx:time'
local DURATION = P .. 'idx:duration'
local EXPIRES = P .. 'idx:expires'
if redis.replicate_commands then redis.replicate_commands() end

local function split(text)
  local sep = string.find(text, ':', 1, true)
  return string.sub(text, 1, sep - 1), string.sub(text, sep + 1)
end

-- Remove one profile and every index entry of it; 1 when its hash still existed.
-- (A payload key can outlive its hash only under maxmemory eviction of the hash.)
local function remove(id)
  local entry = redis.call('HGET', ENTRIES, id)
  if entry then
    local size, route = split(entry)
    redis.call('DECRBY', BYTES, size)
    redis.call('HDEL', ENTRIES, id)
    redis.call('ZREM', P .. 'route:time:' .. route, id)
    redis.call('ZREM', P .. 'route:duration:' .. route, id)
  end
  redis.call('ZREM', TIME, id)
  redis.call('ZREM', DURATION, id)
  redis.call('ZREM', EXPIRES, id)
  local trace, span = split(id)
  redis.call('ZREM', P .. 't:' .. trace, span)
  redis.call('DEL', P .. 'b:' .. id)
  return redis.call('DEL', P .. 'p:' .. id)
end

-- True when both keys of a profile exist.
local function present(id)
  return redis.call('EXISTS', P .. 'p:' .. id, P .. 'b:' .. id) == 2
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Drop up to `limit` profiles whose TTL has passed; how many were due.
local function purge(now, limit)
  local due = redis.call('ZRANGEBYSCORE', EXPIRES, '-inf', string.format('%.0f', now),
                         'LIMIT', 0, limit)
  for _, id in ipairs(due) do remove(id) end
  return #due
end

local function totals()
  return redis.call('HLEN', ENTRIES), tonumber(redis.call('GET', BYTES) or '0')
end
"""

# ARGV: prefix, ttl_ms, max_profiles, max_bytes, then 14 fields per record.
_LUA_PUT = (
    _LUA_COMMON
    + """
local ttl_ms = tonumber(ARGV[2])
local max_profiles = tonumber(ARGV[3])
local max_bytes = tonumber(ARGV[4])
local now = now_ms()
purge(now, """
    + str(_PURGE_BATCH)
    + """)
local expire_at = string.format('%.0f', now + ttl_ms)
for i = 5, #ARGV, 14 do
  local trace, span, method, route = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local status, duration, start = ARGV[i + 4], ARGV[i + 5], ARGV[i + 6]
  local samples, mode, interval = ARGV[i + 7], ARGV[i + 8], ARGV[i + 9]
  local kept_reason, service = ARGV[i + 10], ARGV[i + 11]
  local size, payload = ARGV[i + 12], ARGV[i + 13]
  local id = trace .. ':' .. span
  remove(id)
  local key = P .. 'p:' .. id
  redis.call('HSET', key, 'method', method, 'route', route, 'status_code', status,
             'duration_ms', duration, 'start_time', start, 'sample_count', samples,
             'mode', mode, 'interval_ms', interval, 'kept_reason', kept_reason, 'service', service,
             'size', size,
             'seq', redis.call('INCR', P .. 'seq'))
  redis.call('PEXPIREAT', key, expire_at)
  local payload_key = P .. 'b:' .. id
  redis.call('SET', payload_key, payload)
  redis.call('PEXPIREAT', payload_key, expire_at)
  redis.call('ZADD', TIME, start, id)
  redis.call('ZADD', DURATION, duration, id)
  redis.call('ZADD', EXPIRES, expire_at, id)
  redis.call('ZADD', P .. 'route:time:' .. route, start, id)
  redis.call('ZADD', P .. 'route:duration:' .. route, duration, id)
  local trace_key = P .. 't:' .. trace
  redis.call('ZADD', trace_key, start, span)
  local left = redis.call('PTTL', trace_key)
  if left < ttl_ms then redis.call('PEXPIREAT', trace_key, expire_at) end
  redis.call('HSET', ENTRIES, id, size .. ':' .. route)
  redis.call('INCRBY', BYTES, size)
end
local evicted = 0
local count, bytes = totals()
while count > max_profiles or bytes > max_bytes do
  local oldest = redis.call('ZRANGE', TIME, 0, 0)
  if #oldest == 0 then break end
  remove(oldest[1])
  evicted = evicted + 1
  count, bytes = totals()
end
return evicted
"""
)

# ARGV: prefix. Purges everything due, returns {count, bytes}.
_LUA_STATS = (
    _LUA_COMMON
    + """
local now = now_ms()
while purge(now, """
    + str(_PURGE_BATCH)
    + """) > 0 do end
local count, bytes = totals()
return {count, bytes}
"""
)

# ARGV: prefix, trace_id, span_id or ''. Returns how many profiles were deleted.
_LUA_DELETE = (
    _LUA_COMMON
    + """
local trace, span = ARGV[2], ARGV[3]
local spans
if span ~= '' then spans = {span} else spans = redis.call('ZRANGE', P .. 't:' .. trace, 0, -1) end
local deleted = 0
for _, s in ipairs(spans) do deleted = deleted + remove(trace .. ':' .. s) end
return deleted
"""
)

# ARGV: prefix, ids... Removes what is left of ids whose hash or payload is gone.
_LUA_FORGET = (
    _LUA_COMMON
    + """
local forgotten = 0
for i = 2, #ARGV do
  if not present(ARGV[i]) then
    remove(ARGV[i])
    forgotten = forgotten + 1
  end
end
return forgotten
"""
)


# ARGV: prefix, sorted-set key, max score, min score, offset, count. Read-only: one
# page of the set, highest scores first, one string per member: ID, score and the
# summary fields joined by \x1f (ID and score only when its hash or payload is gone;
# a field the hash lacks, such as kept_reason in a hash of an older version, is "").
# One round trip and one reply element per member: redis-py's parser costs per element.
_LUA_PAGE = (
    """
local P, SEP = ARGV[1], '\\31'
local members = redis.call('ZREVRANGEBYSCORE', ARGV[2], ARGV[3], ARGV[4], 'WITHSCORES',
                           'LIMIT', ARGV[5], ARGV[6])
local page = {}
for i = 1, #members, 2 do
  local row = members[i] .. SEP .. members[i + 1]
  local values = redis.call('HMGET', P .. 'p:' .. members[i], """
    + ", ".join(f"'{name}'" for name in _SUMMARY_FIELDS)
    + """)
  if values[1] and redis.call('EXISTS', P .. 'b:' .. members[i]) == 1 then
    for j = 1, #values do
      if not values[j] then values[j] = '' end
    end
    row = row .. SEP .. table.concat(values, SEP)
  end
  page[#page + 1] = row
end
return page
"""
)


def _import_redis() -> Any:
    try:
        import redis
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return redis


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages and ``store.url``."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    if not password:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


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
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("redis", "rediss") or not parts.hostname:
            raise ValueError(
                f"OTELPROF_STORE: a Redis URL is redis://host:6379/0 or rediss://host:6380/0, "
                f"got {redact_url(url)!r}"
            )
        query: list[tuple[str, str]] = []
        options: dict[str, str] = {}
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if name in ("ttl", "prefix"):
                if name in options:
                    raise ValueError(f"OTELPROF_STORE: {name!r} given twice in the Redis URL")
                options[name] = value
            else:
                query.append((name, value))
        if ttl_seconds is None:
            ttl_seconds = _parse_ttl(options["ttl"]) if "ttl" in options else DEFAULT_TTL_SECONDS
        if (
            isinstance(ttl_seconds, bool)
            or not isinstance(ttl_seconds, (int, float))
            or not math.isfinite(ttl_seconds)
            or ttl_seconds < 0.001
        ):
            raise ValueError(f"ttl_seconds must be a positive number, got {ttl_seconds!r}")
        if prefix is None:
            prefix = options.get("prefix", DEFAULT_PREFIX)
        if not prefix or len(prefix) > 200:
            raise ValueError(f"the Redis key prefix must be 1 to 200 characters, got {prefix!r}")

        redis = _import_redis()
        _check_client_options(redis, urlunsplit(parts._replace(query=urlencode(query))), url)
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        self.url = redact_url(url)
        self.max_profiles = max_profiles
        self.max_bytes = max_bytes
        self.ttl_seconds = float(ttl_seconds)
        self.prefix = prefix
        self._ttl_ms = max(1, round(ttl_seconds * 1000))
        connection_url = urlunsplit(parts._replace(query=urlencode(query)))
        try:
            self._client: redis_py.Redis = redis.Redis.from_url(
                connection_url,
                socket_timeout=DEFAULT_SOCKET_TIMEOUT,
                socket_connect_timeout=DEFAULT_SOCKET_TIMEOUT,
                # One quick retry when a connection breaks mid-call (redis-py already
                # replaces pooled connections that broke while idle); none for timeouts,
                # so a hung server costs one timeout, not redis-py's default ten retries.
                retry=Retry(
                    ExponentialBackoff(cap=0.1, base=0.02),
                    1,
                    supported_errors=(redis.ConnectionError,),
                ),
                retry_on_error=[redis.ConnectionError],
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"OTELPROF_STORE: bad Redis URL {self.url!r}: {exc}") from exc
        self._put_script: Script = self._client.register_script(_LUA_PUT)
        self._stats_script: Script = self._client.register_script(_LUA_STATS)
        self._delete_script: Script = self._client.register_script(_LUA_DELETE)
        self._forget_script: Script = self._client.register_script(_LUA_FORGET)
        self._page_script: Script = self._client.register_script(_LUA_PAGE)
        self._redis = redis
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
            s = record.summary
            if not _TRACE_ID.fullmatch(s.trace_id) or not _SPAN_ID.fullmatch(s.span_id):
                raise ValueError(
                    f"malformed ids {s.trace_id!r}/{s.span_id!r}: expected lowercase hex"
                )
            args += [
                s.trace_id,
                s.span_id,
                s.method,
                s.route,
                str(int(s.status_code)),
                repr(float(s.duration_ms)),
                repr(float(s.start_time)),
                str(int(s.sample_count)),
                s.mode,
                repr(float(s.interval_ms)),
                s.kept_reason,
                s.service.replace("\x1f", " "),  # the page script's field separator
                str(record.size),
                record.payload,
            ]
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
            pipe.hmget(self._key("p:", id_), [*_SUMMARY_FIELDS])
            pipe.get(self._key("b:", id_))
        replies = cast("list[Any]", self._run(pipe.execute))
        found: list[tuple[float, int, ProfileRecord]] = []
        gone: list[str] = []
        for id_, values, payload in zip(ids, replies[::2], replies[1::2], strict=True):
            parsed = _parse_summary(id_, values)
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
        else:
            key = (
                self._key("route:duration:", route)
                if route is not None
                else self._key("idx:duration")
            )
            if min_duration_ms is not None:
                low = min_duration_ms
        # The score range applies the sort key's own filter; when no other filter is
        # left to check, every member matches and a page just above ``limit`` will do
        # (the margin catches ties at the boundary without another round trip).
        post_filter = (
            min_duration_ms is not None
            if order == "newest"
            else (since is not None or until is not None)
        )
        batch = min(max(2 * limit, 64) if post_filter else limit + 8, 1000)
        matches: list[tuple[float, ProfileSummary, int]] = []  # (walk score, summary, seq)
        gone: list[str] = []
        seen: set[str] = set()
        boundary: float | None = None  # walk score of the limit-th match
        offset = 0
        while True:
            page = cast(
                "list[Any]",
                self._run(self._page_script, args=[self.prefix, key, high, low, offset, batch]),
            )
            if not page:
                break
            done = False
            for row in page:
                id_bytes, score_bytes, *values = bytes(row).split(_SEP, len(_SUMMARY_FIELDS) + 1)
                id_, score = id_bytes.decode("ascii"), float(score_bytes)
                if boundary is not None and score < boundary:
                    done = True
                    break
                if id_ in seen:
                    continue
                seen.add(id_)
                parsed = _parse_summary(id_, values)
                if parsed is None:
                    gone.append(id_)
                    continue
                summary, seq = parsed
                if not _matches(summary, route, min_duration_ms, since, until):
                    continue
                matches.append((score, summary, seq))
                if boundary is None and len(matches) >= limit:
                    boundary = score  # keep going through ties, then stop
            if done or len(page) < batch:
                break
            offset += batch
        if gone:
            self._forget(gone)
        if order == "slowest":
            matches.sort(
                key=lambda m: (m[1].duration_ms, m[1].start_time, m[2]),
                reverse=True,
            )
        else:
            matches.sort(key=lambda m: (m[1].start_time, m[2]), reverse=True)
        return [summary for _, summary, _ in matches[:limit]]

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


def _check_client_options(redis: Any, connection_url: str, url: str) -> None:
    """Raise ``ValueError`` now for a port or option redis-py would reject at connect time.

    redis-py connects lazily: ``redis://host:notaport/0`` or ``?bogus_opt=1`` would
    otherwise start fine and fail at the first write. Builds one connection object (it
    does not connect) from the URL's options.
    """
    try:
        urlsplit(url).port  # noqa: B018  (raises ValueError for a port that is not a number)
        pool = redis.ConnectionPool.from_url(connection_url)
        pool.make_connection()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"OTELPROF_STORE: bad Redis URL {redact_url(url)!r}: {exc}") from None


def _parse_ttl(value: str) -> float:
    try:
        ttl = float(value)
    except ValueError:
        raise ValueError(
            f"OTELPROF_STORE: ?ttl= in a Redis URL is a number of seconds, got {value!r}"
        ) from None
    if not math.isfinite(ttl) or ttl < 0.001:
        raise ValueError(f"OTELPROF_STORE: ?ttl= must be a positive number, got {value!r}")
    return ttl


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _parse_summary(id_: str, values: Sequence[Any]) -> tuple[ProfileSummary, int] | None:
    """The summary and seq from an ``HMGET`` of ``_SUMMARY_FIELDS`` (first); None when
    the hash is gone."""
    if not values or values[0] is None:
        return None
    method, status, duration, start, samples, mode, interval, kept_reason, service = values[:9]
    seq, route = values[9:11]
    trace_id, _, span_id = id_.partition(":")
    summary = ProfileSummary(
        trace_id=trace_id,
        span_id=span_id,
        method=_text(method),
        route=_text(route),
        status_code=int(status),
        duration_ms=float(duration),
        start_time=float(start),
        sample_count=int(samples),
        mode=_text(mode),
        interval_ms=float(interval),
        kept_reason=_text(kept_reason) if kept_reason is not None else "",
        service=_text(service) if service is not None else "",
    )
    return summary, int(seq)


def _matches(
    s: ProfileSummary,
    route: str | None,
    min_duration_ms: float | None,
    since: float | None,
    until: float | None,
) -> bool:
    return (
        (route is None or s.route == route)
        and (min_duration_ms is None or s.duration_ms >= min_duration_ms)
        and (since is None or s.start_time >= since)
        and (until is None or s.start_time <= until)
    )
