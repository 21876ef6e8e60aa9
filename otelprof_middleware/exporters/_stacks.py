"""What the exporters read from a pyinstrument session: its timed stacks and their frames.

:func:`stack_samples` walks a session's stacks leaf first with their wall time in
nanoseconds (:data:`SAMPLE_TYPE`), each frame turned into the exporter's own location
index once per session. :func:`frame_parts` reads a frame identifier into function
name, file and lines.

A frame identifier is ``name\\x00file\\x00first_line``, optionally followed by
attributes separated by ``\\x01``: ``c<class>`` (the method's class), ``l<line>`` (the
line being executed) and others that exporters ignore. Synthetic frames such as
``[await]`` have a name only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pyinstrument.frame_info import ATTRIBUTES_SEP, IDENTIFIER_SEP
from pyinstrument.session import Session

__all__ = ["SAMPLE_TYPE", "FrameParts", "frame_parts", "stack_samples"]

SAMPLE_TYPE = ("wall", "nanoseconds")
"""Type and unit of every exported sample value (and of the period): pyinstrument
measures wall-clock time and its samples carry unequal durations, so a stack's value is
its measured time, not a count."""


@dataclass(frozen=True, slots=True)
class FrameParts:
    """One frame of a stack, as exporters name it.

    Attributes:
        name: ``Class.method`` for a method, else the function's name.
        bare_name: the code object's own name, without the class.
        path: the source file's path, ``""`` for synthetic frames.
        first_line: the function's first line, 0 when unknown.
        line: the line being executed, else ``first_line``.
    """

    name: str
    bare_name: str
    path: str
    first_line: int
    line: int


@functools.lru_cache(maxsize=16384)
def frame_parts(frame_info: str) -> FrameParts:
    """Split a pyinstrument frame identifier (cached: stacks repeat the same frames)."""
    identifier, _, attributes = frame_info.partition(ATTRIBUTES_SEP)
    parts = identifier.split(IDENTIFIER_SEP)
    bare = parts[0]
    name = bare or "<unknown>"
    path = parts[1] if len(parts) > 1 else ""
    first_line = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else 0
    line = first_line
    for attribute in attributes.split(ATTRIBUTES_SEP) if attributes else ():
        if attribute[:1] == "c" and len(attribute) > 1:
            name = f"{attribute[1:]}.{name}"
        elif attribute[:1] == "l" and attribute[1:].isdigit():
            line = int(attribute[1:])
    return FrameParts(name=name, bare_name=bare, path=path, first_line=first_line, line=line)


def stack_samples(
    session: Session, location: Callable[[str], int]
) -> Iterator[tuple[tuple[int, ...], int]]:
    """Each timed stack of ``session``: (location indices leaf first, nanoseconds).

    Stacks without a frame or with no time (below a nanosecond) are skipped; the same
    stack may come more than once. ``location`` turns a frame identifier into the
    exporter's location index; it is called once per distinct frame of the session.
    """
    locations: dict[str, int] = {}
    for stack, seconds in session.frame_records:
        nanoseconds = round(seconds * 1e9)
        if nanoseconds <= 0 or not stack:
            continue
        indices: list[int] = []
        for frame_info in reversed(stack):  # the leaf first, as pprof and OTLP want
            index = locations.get(frame_info)
            if index is None:
                index = locations[frame_info] = location(frame_info)
            indices.append(index)
        yield tuple(indices), nanoseconds
