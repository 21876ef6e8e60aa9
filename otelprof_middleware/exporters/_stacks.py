"""What the exporters read from a pyinstrument session: its timed stacks and their frames.

:func:`stack_samples` walks a session's stacks leaf first with their wall time in
nanoseconds (:data:`SAMPLE_TYPE`), each frame turned into the exporter's own location
index once per session. Frames are read with ``_identifiers.frame_parts``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from pyinstrument.session import Session

from .._identifiers import frame_parts, is_thread_root, thread_root

__all__ = ["SAMPLE_TYPE", "stack_samples"]

SAMPLE_TYPE = ("wall", "nanoseconds")
"""Type and unit of every exported sample value (and of the period): pyinstrument
measures wall-clock time and its samples carry unequal durations, so a stack's value is
its measured time, not a count."""


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
                exported = _without_thread_id(frame_info)
                index = locations.get(exported)
                if index is None:
                    index = locations[exported] = location(exported)
                locations[frame_info] = index
            indices.append(index)
        yield tuple(indices), nanoseconds


def _without_thread_id(frame_info: str) -> str:
    """A thread's root frame (always-on) without the thread's id, which it holds where a
    first line goes: a line number to the backends, and one root per thread and process
    in an aggregated flame graph. Other frames as they are."""
    if not is_thread_root(frame_info):
        return frame_info
    return thread_root(frame_parts(frame_info).bare_name, 0)
