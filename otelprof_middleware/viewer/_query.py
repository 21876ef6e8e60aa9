"""Query parsing: every parameter checked and bounded, a 400 naming it when it is not."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode

from .._record import is_span_id
from ..stores._base import ORDERS
from ._http import Abort

__all__ = [
    "BASELINE_LIMIT",
    "DEFAULT_LIMIT",
    "MAX_BASELINE_LIMIT",
    "MAX_LIMIT",
    "ORDERS",
    "Filters",
    "Query",
    "bounded_int",
    "format_of",
    "one",
    "parse_query",
    "route_of",
    "shown",
    "span_id_of",
]

Query = dict[str, list[str]]
"""A parsed query string: every value of each name, in order."""

MAX_LIMIT = 1000
"""Most rows the index shows at once."""

DEFAULT_LIMIT = 100

BASELINE_LIMIT = 20
"""Recent profiles of a route combined into its baseline (``?limit=`` up to 100)."""

MAX_BASELINE_LIMIT = 100
_MAX_QUERY_FIELDS = 50
_MAX_ROUTE_LENGTH = 2048
_SMALL_INT = re.compile(r"[0-9]{1,7}")


def parse_query(query_string: bytes) -> Query:
    """The query's parameters; 400 when there are too many."""
    try:
        pairs = parse_qsl(
            query_string.decode("latin-1"),
            keep_blank_values=True,
            encoding="utf-8",
            errors="replace",
            max_num_fields=_MAX_QUERY_FIELDS,
        )
    except ValueError:
        raise Abort(400, f"too many query parameters (at most {_MAX_QUERY_FIELDS}).\n") from None
    query: Query = {}
    for name, value in pairs:
        query.setdefault(name, []).append(value)
    return query


def one(query: Query, name: str) -> str | None:
    """The single value of ``name``; ``None`` when absent or empty (as forms send it)."""
    values = query.get(name, [])
    if len(values) > 1:
        raise Abort(400, f"query parameter {name!r} given more than once.\n")
    return values[0] if values and values[0] != "" else None


def shown(value: str) -> str:
    """A user-supplied value, shortened and quoted for a plain-text error message."""
    return repr(value[:40] + ("..." if len(value) > 40 else ""))


def format_of(query: Query, formats: Sequence[str], expected: str) -> str:
    """``?format=`` (default ``html``), one of ``formats``; else 400 saying ``expected``."""
    fmt = one(query, "format") or "html"
    if fmt not in formats:
        raise Abort(400, f"unknown format {shown(fmt)}; {expected}.\n")
    return fmt


def span_id_of(query: Query) -> str | None:
    """``?span_id=``, checked; ``None`` when absent."""
    span_id = one(query, "span_id")
    if span_id is not None and not is_span_id(span_id):
        raise Abort(400, "malformed span id: expected 16 lowercase hex digits, not all zero.\n")
    return span_id


def route_of(query: Query) -> str | None:
    """``?route=``, at most ``_MAX_ROUTE_LENGTH`` characters; ``None`` when absent."""
    route = one(query, "route")
    if route is not None and len(route) > _MAX_ROUTE_LENGTH:
        raise Abort(400, f"route is too long (more than {_MAX_ROUTE_LENGTH} characters).\n")
    return route


def bounded_int(query: Query, name: str, default: int, high: int) -> int:
    """``?name=``, a whole number from 1 to ``high``; ``default`` when absent."""
    text = one(query, name)
    if text is None:
        return default
    if not _SMALL_INT.fullmatch(text) or not 1 <= int(text) <= high:
        raise Abort(400, f"{name} must be a whole number from 1 to {high}.\n")
    return int(text)


@dataclass(frozen=True)
class Filters:
    """The index's filters: route, minimum duration, order and row limit."""

    route: str | None = None
    min_duration_ms: float | None = None
    order: str = "newest"
    limit: int = DEFAULT_LIMIT

    @classmethod
    def parse(cls, query: Query) -> Filters:
        """The filters of ``query``; 400 on any bad value."""
        route = route_of(query)
        min_duration_ms: float | None = None
        raw = one(query, "min_duration_ms")
        if raw is not None:
            try:
                min_duration_ms = float(raw)
            except ValueError:
                min_duration_ms = math.nan
            if not math.isfinite(min_duration_ms) or min_duration_ms < 0:
                raise Abort(400, f"min_duration_ms must be a number >= 0, got {shown(raw)}.\n")
        order = one(query, "order") or "newest"
        if order not in ORDERS:
            raise Abort(400, f"order must be newest or slowest, got {shown(order)}.\n")
        limit = DEFAULT_LIMIT
        raw = one(query, "limit")
        if raw is not None:
            if not _SMALL_INT.fullmatch(raw) or not 1 <= int(raw) <= MAX_LIMIT:
                raise Abort(
                    400, f"limit must be an integer from 1 to {MAX_LIMIT}, got {shown(raw)}.\n"
                )
            limit = int(raw)
        return cls(route=route, min_duration_ms=min_duration_ms, order=order, limit=limit)

    @property
    def active(self) -> bool:
        """True when a filter narrows the list (order and limit do not)."""
        return self.route is not None or self.min_duration_ms is not None

    def query(self, **extra: str) -> str:
        """These filters as a query string (defaults left out), plus ``extra``."""
        params: dict[str, str] = {}
        if self.route is not None:
            params["route"] = self.route
        if self.min_duration_ms is not None:
            params["min_duration_ms"] = f"{self.min_duration_ms:g}"
        if self.order != "newest":
            params["order"] = self.order
        if self.limit != DEFAULT_LIMIT:
            params["limit"] = str(self.limit)
        params.update(extra)
        return urlencode(params)
