"""The stored unit: a profile's index fields plus its compressed pyinstrument session."""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from typing import Any

from pyinstrument.session import Session

__all__ = [
    "ProfileRecord",
    "ProfileSummary",
    "compress_session",
    "decompress_session",
    "is_span_id",
    "is_trace_id",
]

_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_SPAN_ID = re.compile(r"[0-9a-f]{16}")
_ZERO_TRACE_ID = "0" * 32
_ZERO_SPAN_ID = "0" * 16


def is_trace_id(value: str) -> bool:
    """True when ``value`` is a valid W3C trace id: 32 lowercase hex digits, not all zero."""
    return _TRACE_ID.fullmatch(value) is not None and value != _ZERO_TRACE_ID


def is_span_id(value: str) -> bool:
    """True when ``value`` is a valid W3C span id: 16 lowercase hex digits, not all zero."""
    return _SPAN_ID.fullmatch(value) is not None and value != _ZERO_SPAN_ID


@dataclass(frozen=True, slots=True)
class ProfileSummary:
    """The index fields of one stored profile: what the viewer's list shows.

    Never holds request headers, bodies or query strings: ``route`` is the route
    template (``/items/{item_id}``), not the raw path.
    """

    trace_id: str
    span_id: str
    method: str
    route: str
    status_code: int
    duration_ms: float
    start_time: float  # seconds since the epoch
    sample_count: int = 0
    mode: str = "hook"
    interval_ms: float = 1.0
    # Why the profile was kept: "slow", "error", "triggered", "min_duration", or ""
    # (unknown: stored by an older version).
    kept_reason: str = ""
    # The ``service.name`` of the service that served the request, so a store shared by
    # several services can show one trace across them; "" when stored by an older version.
    service: str = ""

    def to_json(self) -> dict[str, Any]:
        """The summary as a JSON-ready dict (the viewer's ``?format=json`` row, minus ``url``)."""
        return {
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "method": self.method,
            "route": self.route,
            "status_code": self.status_code,
            "duration_ms": self.duration_ms,
            "start_time": self.start_time,
            "sample_count": self.sample_count,
            "mode": self.mode,
            "interval_ms": self.interval_ms,
            "kept_reason": self.kept_reason,
            "service": self.service,
        }


@dataclass(frozen=True, slots=True)
class ProfileRecord:
    """One stored profile: the summary plus the zlib-compressed pyinstrument session JSON."""

    summary: ProfileSummary
    payload: bytes

    @property
    def size(self) -> int:
        """Bytes this record occupies in a store (payload; the index fields are small)."""
        return len(self.payload)

    def session(self) -> Session:
        """Decode the stored pyinstrument session."""
        return decompress_session(self.payload)

    @classmethod
    def from_session(cls, summary: ProfileSummary, session: Session) -> ProfileRecord:
        """Build a record by serialising and compressing ``session``."""
        return cls(summary=summary, payload=compress_session(session))


# Our own encoder and decoder, bound at import: the writer thread never calls through
# ``json.dumps``/``json.loads``, which apps' test suites patch and assert on.
_encode = json.JSONEncoder(separators=(",", ":")).encode
_decode = json.JSONDecoder().decode


def compress_session(session: Session) -> bytes:
    """Serialise a pyinstrument session to compact JSON and compress it."""
    text = _encode(session.to_json())
    # Level 1: half the time of level 6 for ~15% more bytes (the writer runs in the
    # server process, and under always-on it may store thousands of profiles a second).
    return zlib.compress(text.encode("utf-8"), 1)


def decompress_session(payload: bytes) -> Session:
    """Inverse of :func:`compress_session`. Raises ``ValueError`` on corrupt data."""
    try:
        data = _decode(zlib.decompress(payload).decode("utf-8"))
    except (zlib.error, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"corrupt profile payload: {exc}") from exc
    session: Session = Session.from_json(data)
    return session
