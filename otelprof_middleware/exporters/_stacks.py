"""Reading pyinstrument frame identifiers into function name, file and lines.

A frame identifier is ``name\\x00file\\x00first_line``, optionally followed by
attributes separated by ``\\x01``: ``c<class>`` (the method's class), ``l<line>`` (the
line being executed) and others that exporters ignore. Synthetic frames such as
``[await]`` have a name only.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from pyinstrument.frame_info import ATTRIBUTES_SEP, IDENTIFIER_SEP

__all__ = ["FrameParts", "frame_parts"]


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
