"""pyinstrument frame identifiers: the one place their format is written and read.

An identifier is ``name\\x00file\\x00first_line``, optionally followed by attributes,
each after ``\\x01``: ``c<class>`` (the method's class), ``l<line>`` (the line being
executed), ``h1`` (a frame that hides itself, ``__tracebackhide__``). The engine builds
them (``profiling._frames`` from frames; the synthetic ones below); the viewer, the
renderer and the exporters read them with :func:`frame_parts`.

Synthetic frames the engine adds: a thread's root (:func:`thread_root`, ``<thread>`` as
its file), a C function (``<built-in>``), a worker job whose code is unknown
(``<unknown>``), and placeholders for a profile without samples or start stack.
pyinstrument's own ``[await]`` frames have a name only.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from pyinstrument.frame_info import ATTRIBUTES_SEP, IDENTIFIER_SEP

__all__ = [
    "ATTRIBUTES_SEP",
    "BUILT_IN_FILE",
    "HIDDEN",
    "NO_SAMPLES",
    "NO_START_STACK",
    "THREAD_FILE",
    "UNKNOWN_FILE",
    "FrameParts",
    "class_attribute",
    "frame_parts",
    "identifier",
    "is_thread_root",
    "line_attribute",
    "thread_root",
]

THREAD_FILE = "<thread>"
BUILT_IN_FILE = "<built-in>"
UNKNOWN_FILE = "<unknown>"
HIDDEN = ATTRIBUTES_SEP + "h1"
"""The attribute of a frame pyinstrument hides (its code sets ``__tracebackhide__``)."""


def identifier(name: str, file: str = "", first_line: int = 0) -> str:
    """``name\\x00file\\x00first_line``, without attributes."""
    return f"{name}{IDENTIFIER_SEP}{file}{IDENTIFIER_SEP}{first_line}"


def class_attribute(owner: str) -> str:
    """The attribute naming a method's class."""
    return f"{ATTRIBUTES_SEP}c{owner}"


def line_attribute(line: int) -> str:
    """The attribute giving the line being executed."""
    return f"{ATTRIBUTES_SEP}l{line}"


def thread_root(name: str, ident: int) -> str:
    """The root frame of a thread's stack in an always-on sample (its name and id)."""
    return identifier(name, THREAD_FILE, ident)


_THREAD_ROOT_MARK = f"{IDENTIFIER_SEP}{THREAD_FILE}{IDENTIFIER_SEP}"


def is_thread_root(frame_info: str) -> bool:
    """Whether ``frame_info`` is a thread's root frame (:func:`thread_root`)."""
    return _THREAD_ROOT_MARK in frame_info


NO_SAMPLES = identifier("<no samples>")
"""The one frame of a profile that recorded no sample."""
NO_START_STACK = identifier("<otelprof: no start stack>")
"""Stands in for an empty start stack: it matches no real frame, so pyinstrument's stem
trimming (which pops from the start stack unconditionally) trims nothing."""


@dataclass(frozen=True, slots=True)
class FrameParts:
    """One frame of a stack, read from its identifier.

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
    head, _, attributes = frame_info.partition(ATTRIBUTES_SEP)
    parts = head.split(IDENTIFIER_SEP)
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
