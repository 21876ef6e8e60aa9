"""Independent reads of what a store wrote: a SQLite file's own bookkeeping against its
rows, a Redis prefix's indexes against its profile keys. Shared by the per-backend
tests and the contract of ``test_protocol.py``."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import redis


def raw_sqlite(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def integrity_and_totals(path: Path) -> tuple[str, tuple[int, int], tuple[int, int]]:
    """``(integrity_check, totals row, real count and byte sum)`` read independently."""
    conn = raw_sqlite(path)
    try:
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        totals = conn.execute("SELECT count, bytes FROM totals").fetchone()
        real = conn.execute("SELECT count(*), coalesce(sum(length(payload)), 0) FROM profiles")
        return integrity, tuple(totals), tuple(real.fetchone())
    finally:
        conn.close()


def redis_index(raw: redis.Redis, prefix: str) -> tuple[int, int]:
    """Check every index against the profile hashes, read independently; return
    ``(count, bytes)`` as the keys say."""
    entries = {k.decode(): v.decode() for k, v in raw.hgetall(prefix + "entries").items()}
    ids = set(entries)
    for name in ("idx:time", "idx:duration", "idx:expires"):
        members = {m.decode() for m in raw.zrange(prefix + name, 0, -1)}
        assert members == ids, name
    routes: dict[str, set[str]] = {}
    for id_, entry in entries.items():
        size, _, route = entry.partition(":")
        routes.setdefault(route, set()).add(id_)
        key = prefix + "p:" + id_
        assert raw.exists(key), id_
        assert int(raw.hget(key, "size") or -1) == int(size)
        assert raw.strlen(prefix + "b:" + id_) == int(size)
        atomic = raw.pipeline(transaction=True)  # both read at the same instant
        hash_ttl, payload_ttl = atomic.pttl(key).pttl(prefix + "b:" + id_).execute()
        assert hash_ttl > 0 and abs(hash_ttl - payload_ttl) <= 1  # they expire together
        trace_id, _, span_id = id_.partition(":")
        assert raw.zscore(prefix + "t:" + trace_id, span_id) is not None
    for route, members in routes.items():
        for kind in ("time", "duration"):
            got = {m.decode() for m in raw.zrange(f"{prefix}route:{kind}:{route}", 0, -1)}
            assert got == members, (route, kind)
    listed_routes = {
        k.decode().removeprefix(prefix + "route:time:")
        for k in raw.scan_iter(match=prefix + "route:time:*")
    }
    assert listed_routes == set(routes)
    traces = {k.decode() for k in raw.scan_iter(match=prefix + "t:*")}
    assert traces == {prefix + "t:" + id_.partition(":")[0] for id_ in ids}
    for kind in ("p:", "b:"):  # no profile keys without an index entry
        assert {k.decode() for k in raw.scan_iter(match=prefix + kind + "*")} == {
            prefix + kind + id_ for id_ in ids
        }
    total = sum(int(v.partition(":")[0]) for v in entries.values())
    assert int(raw.get(prefix + "bytes") or 0) == total
    return len(ids), total
