"""The Redis store's keyspace format: its Lua scripts and how a summary is encoded.

What a profile's hash holds, the order of the put script's arguments and the fields the
page script reads all derive from the summary's declaration
(``otelprof_middleware._record.SUMMARY_FIELDS``): the identity fields (trace and span
id) make the profile's ID, every other field is a hash field of the same name, as
text (:meth:`~otelprof_middleware._record.SummaryField.to_text`). A field declared
``ADDED`` is missing from hashes written before it and reads as its default. The
scripts name only the fields the indexes are built on (route, start time, duration).
The key layout is described in ``stores/redis.py``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from .._record import SUMMARY_FIELDS, FieldValue, ProfileRecord, ProfileSummary, SummaryField

__all__ = [
    "HASH_FIELDS",
    "LUA_DELETE",
    "LUA_FORGET",
    "LUA_PAGE",
    "LUA_PUT",
    "LUA_STATS",
    "SEP",
    "parse_summary",
    "record_args",
]

PURGE_BATCH = 1000
"""How many expired profiles one write purges at most."""

SEP = b"\x1f"
"""The page script's field separator."""

_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_SPAN_ID = re.compile(r"[0-9a-f]{16}")

# The put script's arguments per record: every summary field in declaration order, then
# the payload's size and the payload.
_ARGS = (*(f.name for f in SUMMARY_FIELDS), "size", "payload")
_AT = {name: index for index, name in enumerate(_ARGS)}

_STORED = tuple(f for f in SUMMARY_FIELDS if not f.identity)
_ROUTE = next(f for f in _STORED if f.name == "route")

HASH_FIELDS: tuple[str, ...] = (
    *(f.name for f in _STORED if f is not _ROUTE),
    "seq",
    "route",
)
"""The hash fields the readers ask for, in order. ``route`` last: the page script joins
the fields with ``SEP``, and only the last field may then contain ``SEP`` itself (the
other text fields have it replaced by a space when written)."""

_DECODERS: tuple[SummaryField | None, ...] = tuple(
    next((f for f in _STORED if f.name == name), None) for name in HASH_FIELDS
)
# A hash is there when its first field of the first format is (HMGET of a missing key
# gives all nils; a field added later is nil in an older hash that is there).
_PRESENT = next(i for i, f in enumerate(_DECODERS) if f is not None and f.default is None)


def _lua_string(text: str) -> str:
    """``text`` as a Lua string literal (decimal escapes for all but letters and digits)."""
    return "'" + "".join(c if c.isalnum() and c.isascii() else _escape(c) for c in text) + "'"


def _escape(char: str) -> str:
    # Three digits, so a digit after the escape is never read as part of it.
    return "".join(f"\\{byte:03d}" for byte in char.encode("utf-8"))


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


def _arg(name: str) -> str:
    """The Lua expression of this record's argument ``name`` (``i`` is its first)."""
    return f"ARGV[i + {_AT[name]}]"


_HSET_PAIRS = ", ".join(f"'{f.name}', {_arg(f.name)}" for f in _STORED)

LUA_PUT = (
    _LUA_COMMON
    + f"""
-- ARGV: prefix, ttl_ms, max_profiles, max_bytes, then {len(_ARGS)} per record:
-- {", ".join(_ARGS)}.
local ttl_ms = tonumber(ARGV[2])
local max_profiles = tonumber(ARGV[3])
local max_bytes = tonumber(ARGV[4])
local now = now_ms()
purge(now, {PURGE_BATCH})
local expire_at = string.format('%.0f', now + ttl_ms)
for i = 5, #ARGV, {len(_ARGS)} do
  local trace, span = {_arg("trace_id")}, {_arg("span_id")}
  local route, duration, start = {_arg("route")}, {_arg("duration_ms")}, {_arg("start_time")}
  local size, payload = {_arg("size")}, {_arg("payload")}
  local id = trace .. ':' .. span
  remove(id)
  local key = P .. 'p:' .. id
  redis.call('HSET', key, {_HSET_PAIRS},
             'size', size, 'seq', redis.call('INCR', P .. 'seq'))
"""
    + """
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
"""Purge expired entries, write each record, index it, evict the oldest; returns how
many were evicted."""

LUA_STATS = (
    _LUA_COMMON
    + f"""
-- ARGV: prefix. Purges everything due, returns {{count, bytes}}.
local now = now_ms()
while purge(now, {PURGE_BATCH}) > 0 do end
local count, bytes = totals()
return {{count, bytes}}
"""
)

LUA_DELETE = (
    _LUA_COMMON
    + """
-- ARGV: prefix, trace_id, span_id or ''. Returns how many profiles were deleted.
local trace, span = ARGV[2], ARGV[3]
local spans
if span ~= '' then spans = {span} else spans = redis.call('ZRANGE', P .. 't:' .. trace, 0, -1) end
local deleted = 0
for _, s in ipairs(spans) do deleted = deleted + remove(trace .. ':' .. s) end
return deleted
"""
)

LUA_FORGET = (
    _LUA_COMMON
    + """
-- ARGV: prefix, ids... Removes what is left of ids whose hash or payload is gone.
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

_DEFAULTS = ", ".join(
    _lua_string(f.to_text(f.default) if f is not None and f.default is not None else "")
    for f in _DECODERS
)

_HMGET_NAMES = ", ".join(f"'{name}'" for name in HASH_FIELDS)  # identifiers: no escaping

LUA_PAGE = f"""
-- ARGV: prefix, sorted-set key, max score, min score, offset, count. Read-only: one
-- page of the set, highest scores first, one string per member: ID, score and the
-- summary fields joined by \\x1f (ID and score only when its hash or payload is gone; a
-- field the hash lacks, such as kept_reason in a hash of an older version, reads as
-- its default, else ""). One round trip and one reply element per member: redis-py's
-- parser costs per element.
local P, SEP = ARGV[1], '\\31'
local DEFAULTS = {{{_DEFAULTS}}}
local members = redis.call('ZREVRANGEBYSCORE', ARGV[2], ARGV[3], ARGV[4], 'WITHSCORES',
                           'LIMIT', ARGV[5], ARGV[6])
local page = {{}}
for i = 1, #members, 2 do
  local row = members[i] .. SEP .. members[i + 1]
  local values = redis.call('HMGET', P .. 'p:' .. members[i], {_HMGET_NAMES})
  if values[{_PRESENT + 1}] and redis.call('EXISTS', P .. 'b:' .. members[i]) == 1 then
    for j = 1, #values do
      if not values[j] then values[j] = DEFAULTS[j] end
    end
    row = row .. SEP .. table.concat(values, SEP)
  end
  page[#page + 1] = row
end
return page
"""


def record_args(record: ProfileRecord) -> list[str | bytes]:
    """The put script's arguments for ``record``.

    Raises:
        ValueError: its trace or span id is not lowercase hex of the right length.
    """
    s = record.summary
    if not _TRACE_ID.fullmatch(s.trace_id) or not _SPAN_ID.fullmatch(s.span_id):
        raise ValueError(f"malformed ids {s.trace_id!r}/{s.span_id!r}: expected lowercase hex")
    args: list[str | bytes] = []
    for f in SUMMARY_FIELDS:
        text = f.to_text(getattr(s, f.name))
        if f.type is str and f is not _ROUTE:
            text = text.replace("\x1f", " ")  # the page script's field separator
        args.append(text)
    args += [str(record.size), record.payload]
    return args


def _reader(f: SummaryField) -> Callable[[Any], FieldValue]:
    """Reads a present value of ``f`` from a reply: ``int`` and ``float`` parse bytes as
    they are; text is decoded."""
    if f.type is str:
        return lambda raw: raw.decode("utf-8") if isinstance(raw, bytes) else raw
    return f.type


# Per declared field, in declaration order: ("id", which part of the ID) or
# ("hash", its position in HASH_FIELDS, its reader, the field).
_READERS: tuple[tuple[int, int, Callable[[Any], FieldValue], SummaryField], ...] = tuple(
    (1, ("trace_id", "span_id").index(f.name), str, f)
    if f.identity
    else (0, HASH_FIELDS.index(f.name), _reader(f), f)
    for f in SUMMARY_FIELDS
)
_SEQ = HASH_FIELDS.index("seq")


def parse_summary(id_: str, values: Sequence[Any]) -> tuple[ProfileSummary, int] | None:
    """The summary and ``seq`` from the values of ``HASH_FIELDS`` (an ``HMGET`` or a
    page row); ``None`` when the hash is gone."""
    if len(values) <= _PRESENT or values[_PRESENT] is None:
        return None
    ids = id_.split(":", 1)
    args: list[Any] = []
    for from_id, index, read, f in _READERS:
        if from_id:
            args.append(ids[index])
        else:
            raw = values[index]
            args.append(f.from_text(None) if raw is None else read(raw))
    return ProfileSummary(*args), int(values[_SEQ])
