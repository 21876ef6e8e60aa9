"""_record.py: the stored summary's fields and its JSON form, and the payload."""

from __future__ import annotations

import dataclasses
import json
import zlib

import pytest

from otelprof_middleware import _record
from otelprof_middleware._record import (
    ENCODE_RECORDS,
    ProfileSummary,
    compress_session,
    decompress_session,
)

from .helpers import make_session, make_summary


def test_kept_reason_defaults_to_unknown() -> None:
    """Constructors that predate kept_reason keep working; "" means not recorded."""
    assert make_summary().kept_reason == ""


def test_kept_reason_follows_interval_ms() -> None:
    names = [f.name for f in dataclasses.fields(ProfileSummary)]
    assert names[names.index("interval_ms") + 1] == "kept_reason"


def test_to_json_has_every_field() -> None:
    summary = make_summary(
        duration_ms=12.5,
        sample_count=9,
        mode="always_on",
        interval_ms=5.0,
        kept_reason="slow",
        service="api",
    )
    data = summary.to_json()
    assert data == {
        "trace_id": f"{1:032x}",
        "span_id": f"{1:016x}",
        "method": "GET",
        "route": "/items/{item_id}",
        "status_code": 200,
        "duration_ms": 12.5,
        "start_time": 1_700_000_000.0,
        "sample_count": 9,
        "mode": "always_on",
        "interval_ms": 5.0,
        "kept_reason": "slow",
        "service": "api",
    }
    assert set(data) == {f.name for f in dataclasses.fields(ProfileSummary)}
    assert json.loads(json.dumps(data)) == data
    assert make_summary().to_json()["kept_reason"] == ""
    assert make_summary().to_json()["service"] == ""


def test_a_long_profile_is_encoded_a_slice_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer thread lets other threads (requests) run while it encodes a long
    profile: no call of the C JSON encoder, which holds the GIL throughout, gets more
    than ENCODE_RECORDS frame records. The payload is the same JSON document."""
    records = [
        ([f"handler_{n % 7}\x00app/views.py\x00{n % 300}", "work\x00app/work.py\x0012"], 0.005)
        for n in range(5 * ENCODE_RECORDS + 3)
    ]
    session = make_session(records, sys_path=["/app"])
    encoded: list[int] = []
    encode = _record._encode

    def counting_encode(value: object) -> str:
        encoded.append(len(value) if isinstance(value, list) else 0)
        return encode(value)

    monkeypatch.setattr(_record, "_encode", counting_encode)
    payload = compress_session(session)
    assert max(encoded) <= ENCODE_RECORDS
    assert sum(encoded) == len(records)
    assert json.loads(zlib.decompress(payload)) == json.loads(json.dumps(session.to_json()))
    assert decompress_session(payload).sample_count == len(records)
    empty = make_session([])
    assert json.loads(zlib.decompress(compress_session(empty))) == empty.to_json()
