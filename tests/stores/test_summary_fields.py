"""The one declaration of the stored summary: what derives from it, and that a new field
is one line (the stores, their formats and their migrations follow)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import redis

import otelprof_middleware
from otelprof_middleware._record import (
    ADDED,
    SUMMARY_FIELD_NAMES,
    SUMMARY_FIELDS,
    ProfileSummary,
    _declared_fields,
)
from otelprof_middleware.stores import _redis_format, _sqlite_sql
from tests.redis_server import RedisServer  # the redis_server fixture: conftest.py
from tests.stores.test_compat import COMPAT, _restore

_SUMMARY = ProfileSummary(
    *("a" * 32, "b" * 16, "GET", "/items/{item_id}", 200, 0.1 + 0.2, 1_765_000_000.123456789),
    *(7, "always_on", 0.5, "slow", "api"),
)


def test_the_declaration_is_the_dataclass() -> None:
    assert tuple(f.name for f in dataclasses.fields(ProfileSummary)) == SUMMARY_FIELD_NAMES
    assert [f.name for f in SUMMARY_FIELDS if f.identity] == ["trace_id", "span_id"]
    assert {f.name: f.default for f in SUMMARY_FIELDS if f.default is not None} == {
        "kept_reason": "",
        "service": "",
    }
    assert list(_SUMMARY.to_json()) == list(SUMMARY_FIELD_NAMES)
    assert ProfileSummary(**_SUMMARY.to_json()) == _SUMMARY


def test_text_form_round_trips_exactly() -> None:
    for f in SUMMARY_FIELDS:
        value = getattr(_SUMMARY, f.name)
        text = f.to_text(value)
        assert f.from_text(text) == value and type(f.from_text(text)) is f.type
        assert f.from_text(text.encode()) == value
    by_name = {f.name: f for f in SUMMARY_FIELDS}
    assert by_name["duration_ms"].to_text(0.1 + 0.2) == "0.30000000000000004"
    assert by_name["status_code"].to_text(200) == "200"


def test_a_missing_value_reads_as_the_default_only_where_there_is_one() -> None:
    by_name = {f.name: f for f in SUMMARY_FIELDS}
    assert by_name["kept_reason"].from_text(None) == ""
    with pytest.raises(ValueError, match="lacks 'method'"):
        by_name["method"].from_text(None)
    with pytest.raises(ValueError):
        by_name["status_code"].from_text(b"not a number")


def test_a_field_the_stores_cannot_hold_is_refused() -> None:
    @dataclasses.dataclass
    class WithList:
        tags: list[str]

    @dataclasses.dataclass
    class AddedWithoutDefault:
        region: str = dataclasses.field(metadata=ADDED)

    with pytest.raises(TypeError, match=r"WithList\.tags: a stored field is str, int or float"):
        _declared_fields(WithList)
    with pytest.raises(TypeError, match="ADDED field needs a default"):
        _declared_fields(AddedWithoutDefault)


def test_sqlite_and_redis_formats_derive_from_the_declaration() -> None:
    assert _sqlite_sql.ADDED_COLUMNS == (
        ("kept_reason", "TEXT NOT NULL DEFAULT ''"),
        ("service", "TEXT NOT NULL DEFAULT ''"),
    )
    assert ", ".join(SUMMARY_FIELD_NAMES) == _sqlite_sql.SUMMARY_COLUMNS
    assert _sqlite_sql.INSERT.count("?") == len(SUMMARY_FIELDS) + 2
    assert _redis_format.HASH_FIELDS[-2:] == ("seq", "route")
    assert set(_redis_format.HASH_FIELDS) == {"seq"} | {
        f.name for f in SUMMARY_FIELDS if not f.identity
    }


# -- a new field is one line -------------------------------------------------------------

_ANCHOR = '    service: str = field(default="", metadata=ADDED)\n'
_NEW_FIELDS = (
    '    region: str = field(default="eu-west\'1", metadata=ADDED)\n'
    "    attempt: int = field(default=1, metadata=ADDED)\n"
)

# Runs against the copy of the package with the two new lines. Old rows and hashes (the
# fixtures written before the fields existed) read as the defaults; new ones keep theirs.
_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from otelprof_middleware._record import ProfileRecord, ProfileSummary
    from otelprof_middleware.stores import RedisStore, SQLiteStore

    db, redis_url, prefix = sys.argv[1:4]
    new = ProfileRecord(
        ProfileSummary("c" * 32, "d" * 16, "GET", "/new", 200, 5.0, 1_765_000_010.0,
                       region="us\\x1feast", attempt=3),
        b"new payload",
    )
    out = {}
    for name, store in (("sqlite", SQLiteStore(db)),
                        ("redis", RedisStore(redis_url, prefix=prefix))):
        old = [(s.region, s.attempt) for s in store.list()]
        old_get = [(r.summary.region, r.summary.attempt)
                   for r in store.get("0af7651916cd43dd8448eb211c80319c")]
        store.put(new)
        [back] = store.get(new.summary.trace_id)
        out[name] = {
            "old_list": old, "old_get": old_get,
            "new": back.summary.to_json(), "new_payload": back.payload.decode(),
            "listed": [s.to_json() for s in store.list(limit=1)],
        }
        store.close()
    print(json.dumps(out))
    """
)


def test_a_new_field_is_one_line_in_the_declaration(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    package = Path(otelprof_middleware.__file__).parent
    copy = tmp_path / "pkg" / "otelprof_middleware"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    record_py = copy / "_record.py"
    source = record_py.read_text()
    assert source.count(_ANCHOR) == 1, "the declaration's last field moved: update _ANCHOR"
    record_py.write_text(source.replace(_ANCHOR, _ANCHOR + _NEW_FIELDS))

    db = tmp_path / "head.db"
    shutil.copyfile(COMPAT / "head.db", db)
    prefix = f"fields:{uuid.uuid4().hex[:8]}:"
    client = redis.Redis.from_url(redis_server.url + "/0")
    try:
        _restore(client, prefix)
        run = subprocess.run(
            [sys.executable, "-c", _SCRIPT, str(db), redis_server.url + "/0", prefix],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(copy.parent)},
        )
        assert run.returncode == 0, run.stderr
        out = json.loads(run.stdout)
        new_hash = client.hgetall(f"{prefix}p:{'c' * 32}:{'d' * 16}")
    finally:
        client.close()

    defaults = ["eu-west'1", 1]
    for name in ("sqlite", "redis"):
        assert out[name]["old_list"] == [defaults] * 4
        assert out[name]["old_get"] == [defaults]
        assert out[name]["new_payload"] == "new payload"
        assert out[name]["listed"] == [out[name]["new"]]
        assert out[name]["new"]["attempt"] == 3
        assert list(out[name]["new"])[-2:] == ["region", "attempt"]
    assert out["sqlite"]["new"]["region"] == "us\x1feast"
    assert out["redis"]["new"]["region"] == "us east"  # the page script's separator
    assert new_hash[b"region"] == b"us east" and new_hash[b"attempt"] == b"3"
    conn = sqlite3.connect(db)
    try:
        columns = {row[1]: row[4] for row in conn.execute("PRAGMA table_info(profiles)")}
    finally:
        conn.close()
    assert columns["region"] == "'eu-west''1'" and columns["attempt"] == "1"
