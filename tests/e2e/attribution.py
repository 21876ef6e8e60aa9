"""How much of a marker's known time a stored profile attributes to it (issue 4's metric)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from pyinstrument.frame import AWAIT_FRAME_IDENTIFIER
from pyinstrument.session import Session

_MARKER = re.compile(r"marker_(\d+)")


def _frame_name(identifier: str) -> str:
    return identifier.split("\x00", 1)[0]


@dataclass(frozen=True)
class Attribution:
    own_seconds: float  # time in records whose stack holds the request's own marker
    foreign: frozenset[int]  # other markers found anywhere in the profile
    sample_count: int

    def own_fraction(self, known_seconds: float) -> float:
        return self.own_seconds / known_seconds


def attribute(session: Session, own: int) -> Attribution:
    """Sum the time under ``marker_<own>`` (awaits excluded) and list foreign markers."""
    own_seconds = 0.0
    foreign: set[int] = set()
    for stack, seconds in session.frame_records:
        markers = _markers_in(stack)
        if own in markers and stack[-1] != AWAIT_FRAME_IDENTIFIER:
            own_seconds += seconds
        foreign.update(m for m in markers if m != own)
    return Attribution(own_seconds, frozenset(foreign), len(session.frame_records))


def _markers_in(stack: Iterable[str]) -> set[int]:
    found: set[int] = set()
    for identifier in stack:
        match = _MARKER.fullmatch(_frame_name(identifier))
        if match:
            found.add(int(match.group(1)))
    return found
