"""How a moment is written for people: the viewer's pages and ``otelprof`` both use it."""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["utc"]


def utc(epoch: float) -> str:
    """``epoch`` (seconds) as ISO 8601 UTC with milliseconds (``...T12:00:00.000Z``);
    ``"?"`` when it is no time a computer can show."""
    try:
        moment = datetime.fromtimestamp(epoch, UTC)
    except (OverflowError, OSError, ValueError, TypeError):
        return "?"
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
