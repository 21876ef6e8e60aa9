"""_record.py: the stored summary's fields and its JSON form."""

from __future__ import annotations

import dataclasses
import json

from otelprof_middleware._record import ProfileSummary

from .helpers import make_summary


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
