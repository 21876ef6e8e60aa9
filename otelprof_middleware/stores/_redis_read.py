"""How the Redis store reads: ``get``'s records from its replies, and ``list``'s walk.

Pure functions over what Redis returned; the store (``stores/redis.py``) makes the calls
and removes what is left of the profiles found gone (``_redis_format.LUA_FORGET``).

``list`` walks one sorted set from its high end, a page per call of the read-only page
script (``_redis_format.LUA_PAGE``): :func:`list_plan` picks the set, its score range
and the page size, :func:`walk` reads pages down to the ``limit``-th match, and
:func:`ranked` puts what it found in the asked order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from .._record import ProfileRecord, ProfileSummary
from . import _redis_format as fmt

__all__ = ["ListPlan", "list_plan", "ranked", "records", "walk"]

Found: TypeAlias = tuple[float, ProfileSummary, int]
"""A member ``list`` keeps: its walk score, its summary and its ``seq``."""


@dataclass(frozen=True, slots=True)
class ListPlan:
    """Which sorted set ``list`` walks, the score range it reads and its page size."""

    key: str
    high: float | str
    low: float | str
    batch: int


def list_plan(
    prefix: str,
    limit: int,
    route: str | None,
    min_duration_ms: float | None,
    since: float | None,
    until: float | None,
    order: str,
) -> ListPlan:
    """The walk for ``RedisStore.list``'s arguments (``limit`` at least 1).

    By start time (``newest``) or by duration (``slowest``), the route's own sets when
    ``route`` is given. The score range applies ``since``/``until`` or
    ``min_duration_ms`` inside Redis; the other filter is left to the caller.
    """
    high: float | str = "+inf"
    low: float | str = "-inf"
    if order == "newest":
        key = prefix + ("route:time:" + route if route is not None else "idx:time")
        if until is not None:
            high = until
        if since is not None:
            low = since
        post_filter = min_duration_ms is not None
    else:
        key = prefix + ("route:duration:" + route if route is not None else "idx:duration")
        if min_duration_ms is not None:
            low = min_duration_ms
        post_filter = since is not None or until is not None
    # The score range applies the sort key's own filter; when no other filter is
    # left to check, every member matches and a page just above ``limit`` will do
    # (the margin catches ties at the boundary without another round trip).
    batch = min(max(2 * limit, 64) if post_filter else limit + 8, 1000)
    return ListPlan(key, high, low, batch)


def walk(
    page: Callable[[int], list[Any]],
    batch: int,
    limit: int,
    wanted: Callable[[ProfileSummary], bool],
) -> tuple[list[Found], list[str]]:
    """Walk a sorted set from its high end a page at a time: the ``(walk score, summary,
    seq)`` of the wanted members, down to the ``limit``-th one's score (ties included),
    and the IDs whose keys are gone.

    Args:
        page: the page script's rows from ``offset`` on (at most ``batch`` of them).
        batch: the page size.
        limit: how many wanted members the caller returns.
        wanted: whether a member's summary passes the filters the score range did not.
    """
    found: list[Found] = []
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


def ranked(found: list[Found], order: str, limit: int) -> list[ProfileSummary]:
    """The first ``limit`` summaries of ``found`` in ``order``: ``"newest"`` (start time,
    then insertion, descending) or ``"slowest"`` (duration, then the same)."""
    if order == "slowest":
        found.sort(key=lambda m: (m[1].duration_ms, m[1].start_time, m[2]), reverse=True)
    else:
        found.sort(key=lambda m: (m[1].start_time, m[2]), reverse=True)
    return [summary for _, summary, _ in found[:limit]]


def records(
    ids: Sequence[str], replies: Sequence[Any], *, listed: bool
) -> tuple[list[ProfileRecord], list[str]]:
    """``get``'s records, newest first, and the IDs whose keys are gone.

    Args:
        ids: the IDs (``<trace_id>:<span_id>``) asked for.
        replies: per ID, an ``HMGET`` of ``HASH_FIELDS`` then a ``GET`` of the payload.
        listed: the IDs came from the trace's index, so one with neither key left is
            gone too (when not, it may never have been stored).
    """
    found: list[tuple[float, int, ProfileRecord]] = []
    gone: list[str] = []
    for id_, values, payload in zip(ids, replies[::2], replies[1::2], strict=True):
        parsed = fmt.parse_summary(id_, values)
        if parsed is None or payload is None:
            # Listed by the trace's index, or half there: remove the rest.
            if listed or parsed is not None or payload is not None:
                gone.append(id_)
            continue
        summary, seq = parsed
        found.append((summary.start_time, seq, ProfileRecord(summary, bytes(payload))))
    found.sort(key=lambda item: (item[0], item[1]), reverse=True)
    return [record for _, _, record in found], gone
