"""How times, durations and counts are written, in the pages and in ``otelprof ls``."""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["ms_text", "plural", "utc"]


def utc(epoch: float) -> str:
    """``epoch`` (seconds) as ISO 8601 UTC with milliseconds (``...T12:00:00.000Z``);
    ``"?"`` when it is no time a computer can show."""
    try:
        moment = datetime.fromtimestamp(epoch, UTC)
    except (OverflowError, OSError, ValueError, TypeError):
        return "?"
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def ms_text(duration_ms: float) -> str:
    """A duration for titles: ``312 ms``, ``4.2 ms``."""
    return f"{duration_ms:.0f} ms" if duration_ms >= 10 else f"{duration_ms:.1f} ms"


def plural(count: int, word: str) -> str:
    """``1 request``, ``2 requests``, ``0 requests``."""
    return f"{count} {word}{'' if count == 1 else 's'}"
