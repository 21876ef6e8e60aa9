"""How durations and counts are written in the pages (moments: ``.._time.utc``)."""

from __future__ import annotations

__all__ = ["ms_text", "plural"]


def ms_text(duration_ms: float) -> str:
    """A duration for titles: ``312 ms``, ``4.2 ms``."""
    return f"{duration_ms:.0f} ms" if duration_ms >= 10 else f"{duration_ms:.1f} ms"


def plural(count: int, word: str) -> str:
    """``1 request``, ``2 requests``, ``0 requests``."""
    return f"{count} {word}{'' if count == 1 else 's'}"
