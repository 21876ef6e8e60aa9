"""The stored unit: a profile's index fields plus its compressed pyinstrument session."""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from types import MappingProxyType
from typing import Any, TypeAlias, get_type_hints

from pyinstrument.session import Session

__all__ = [
    "ADDED",
    "IDENTITY",
    "SUMMARY_FIELDS",
    "SUMMARY_FIELD_NAMES",
    "FieldValue",
    "ProfileRecord",
    "ProfileSummary",
    "SummaryField",
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


# Metadata of ProfileSummary's fields, read by ``SUMMARY_FIELDS`` (and so by the stores).
IDENTITY: Mapping[str, bool] = MappingProxyType({"identity": True})
"""A field of the profile's identity (its key in a store), not an index column."""

ADDED: Mapping[str, bool] = MappingProxyType({"added": True})
"""A field added after the first stored format: rows and hashes written before it read
as the field's default, and SQLite files gain it as a column with that default."""


@dataclass(frozen=True, slots=True)
class ProfileSummary:
    """The index fields of one stored profile: what the viewer's list shows.

    Never holds request headers, bodies or query strings: ``route`` is the route
    template (``/items/{item_id}``), not the raw path.

    The one declaration of the stored summary: the JSON form, the SQLite columns, insert,
    row reading and migration, and the Redis hash and script arguments all derive from
    these fields (see :data:`SUMMARY_FIELDS`). A new field is one line here, of type
    ``str``, ``int`` or ``float``, with ``field(default=..., metadata=ADDED)`` so that
    profiles stored before it read as that default.
    """

    trace_id: str = field(metadata=IDENTITY)
    span_id: str = field(metadata=IDENTITY)
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
    kept_reason: str = field(default="", metadata=ADDED)
    # The ``service.name`` of the service that served the request, so a store shared by
    # several services can show one trace across them; "" when stored by an older version.
    service: str = field(default="", metadata=ADDED)

    def to_json(self) -> dict[str, Any]:
        """The summary as a JSON-ready dict (the viewer's ``?format=json`` row, minus ``url``)."""
        return {name: getattr(self, name) for name in SUMMARY_FIELD_NAMES}


FieldValue: TypeAlias = str | int | float
"""The value of a summary field."""

_TYPES: dict[object, type[str] | type[int] | type[float]] = {str: str, int: int, float: float}


@dataclass(frozen=True, slots=True)
class SummaryField:
    """How one field of :class:`ProfileSummary` is stored, read off its declaration.

    Attributes:
        name: the attribute, JSON key, SQLite column and Redis hash field.
        type: ``str``, ``int`` or ``float``.
        identity: part of the profile's key (``trace_id``, ``span_id``): a Redis key,
            not a hash field.
        default: what a row or hash stored before the field existed reads as; ``None``
            for the fields of the first stored format (always present).
    """

    name: str
    type: type[str] | type[int] | type[float]
    identity: bool
    default: FieldValue | None

    def to_text(self, value: FieldValue) -> str:
        """``value`` as text (Redis hash values and script arguments): ints in decimal,
        floats as ``repr`` (round-trips exactly), text as is."""
        if self.type is float:
            return repr(float(value))
        if self.type is int:
            return str(int(value))
        return str(value)

    def from_text(self, raw: bytes | str | None) -> FieldValue:
        """Inverse of :meth:`to_text`; a missing value (``None``) reads as the default.

        Raises:
            ValueError: the value is missing and the field has no default for old
                profiles, or it is not a number where one is expected.
        """
        if raw is None:
            if self.default is None:
                raise ValueError(f"stored profile summary lacks {self.name!r}")
            return self.default
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return self.type(text)


def _declared_fields(cls: type[Any]) -> tuple[SummaryField, ...]:
    """The :class:`SummaryField` of each field of the dataclass ``cls``.

    Raises:
        TypeError: a field is not ``str``, ``int`` or ``float``, or is ``ADDED``
            without a default.
    """
    hints = get_type_hints(cls)
    declared: list[SummaryField] = []
    for f in fields(cls):
        kind = _TYPES.get(hints[f.name])
        if kind is None:
            raise TypeError(f"{cls.__name__}.{f.name}: a stored field is str, int or float")
        added = bool(f.metadata.get("added"))
        if added and f.default is MISSING:
            raise TypeError(f"{cls.__name__}.{f.name}: an ADDED field needs a default")
        default: FieldValue | None = f.default if added else None  # type: ignore[assignment]
        declared.append(SummaryField(f.name, kind, bool(f.metadata.get("identity")), default))
    return tuple(declared)


SUMMARY_FIELDS: tuple[SummaryField, ...] = _declared_fields(ProfileSummary)
"""The stored fields of :class:`ProfileSummary`, in declaration order."""

SUMMARY_FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in SUMMARY_FIELDS)
"""Their names, in the same order (the JSON keys)."""


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


ENCODE_RECORDS = 200
"""Frame records serialised per call of the JSON encoder (see :func:`compress_session`)."""


def compress_session(session: Session) -> bytes:
    """Serialise a pyinstrument session to compact JSON and compress it.

    The frame records are encoded and compressed ``ENCODE_RECORDS`` at a time. The C
    JSON encoder holds the GIL for the whole of one call, and a long request's profile
    is tens of MB of JSON: encoded at once, it stopped every other thread of the server
    process, requests included, for 80 ms (3,700 samples) and more. Between slices the
    writer thread lets them run; zlib lets go of the GIL by itself. The payload is the
    same JSON document, with ``frame_records`` first.
    """
    head = _encode(session.to_json(include_frame_records=False))
    records = session.frame_records
    # Level 1: half the time of level 6 for ~15% more bytes (the writer runs in the
    # server process, and under always-on it may store thousands of profiles a second).
    compressor = zlib.compressobj(1)
    parts = [compressor.compress(b'{"frame_records":[')]
    for start in range(0, len(records), ENCODE_RECORDS):
        text = _encode(records[start : start + ENCODE_RECORDS])[1:-1]
        parts.append(compressor.compress((("," if start else "") + text).encode("utf-8")))
    rest = "]}" if head == "{}" else "]," + head[1:]
    parts.append(compressor.compress(rest.encode("utf-8")))
    parts.append(compressor.flush())
    return b"".join(parts)


def decompress_session(payload: bytes) -> Session:
    """Inverse of :func:`compress_session`. Raises ``ValueError`` on corrupt data."""
    try:
        data = _decode(zlib.decompress(payload).decode("utf-8"))
    except (zlib.error, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"corrupt profile payload: {exc}") from exc
    session: Session = Session.from_json(data)
    return session
