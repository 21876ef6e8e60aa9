"""Route baselines: how a request compares with the recent requests of its route.

A *baseline* is the recent kept profiles of one route combined into one pyinstrument
session (pyinstrument's ``Session.combine``), so every renderer draws "what this route
usually does". A *diff* puts one request next to that baseline, function by function:
the time each function was on the stack (inclusive, counted once per sample even when
recursive) in this request versus the mean over the baseline's requests. A *diff tree*
does the same per call path (frame by frame, as a flame graph draws them), with self
and total time on each side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import reduce

from pyinstrument.frame import AWAIT_FRAME_IDENTIFIER, OUT_OF_CONTEXT_FRAME_IDENTIFIER
from pyinstrument.session import Session

from .._identifiers import frame_parts, is_thread_root

__all__ = ["DiffNode", "DiffRow", "FunctionKey", "combine", "diff", "diff_tree", "function_times"]

FunctionKey = tuple[str, str, int]
"""(function name, file, first line): one function, whatever line it was sampled at."""

_SYNTHETIC = frozenset({AWAIT_FRAME_IDENTIFIER, OUT_OF_CONTEXT_FRAME_IDENTIFIER})


def combine(sessions: Sequence[Session]) -> Session:
    """All ``sessions`` as one (aggregate views only: samples are concatenated).

    Raises:
        ValueError: no sessions.
    """
    if not sessions:
        raise ValueError("no sessions to combine")
    return reduce(Session.combine, sessions)


def _key(identifier: str) -> FunctionKey | None:
    if identifier in _SYNTHETIC:
        return None
    if is_thread_root(identifier):
        return None
    parts = frame_parts(identifier)
    return (parts.bare_name, parts.path, parts.first_line)


def function_times(session: Session) -> tuple[dict[FunctionKey, float], float]:
    """Inclusive seconds per function, and the session's total sampled seconds."""
    times: dict[FunctionKey, float] = {}
    total = 0.0
    for stack, seconds in session.frame_records:
        total += seconds
        seen: set[FunctionKey] = set()
        for identifier in stack:
            key = _key(identifier)
            if key is not None and key not in seen:
                seen.add(key)
                times[key] = times.get(key, 0.0) + seconds
    return times, total


@dataclass(frozen=True, slots=True)
class DiffRow:
    """One function: its time in this request against the route's mean."""

    function: str
    filename: str
    line: int
    request_ms: float
    baseline_ms: float  # mean over the baseline's requests (0 where absent)
    delta_ms: float  # request_ms - baseline_ms: positive = took more this time
    request_share: float  # of this request's sampled time
    baseline_share: float  # of the baseline's sampled time

    def to_json(self) -> dict[str, object]:
        """The row as a JSON-ready dict."""
        return {
            "function": self.function,
            "file": self.filename,
            "line": self.line,
            "request_ms": round(self.request_ms, 3),
            "baseline_ms": round(self.baseline_ms, 3),
            "delta_ms": round(self.delta_ms, 3),
            "request_share": round(self.request_share, 4),
            "baseline_share": round(self.baseline_share, 4),
        }


def diff(request: Session, baseline: Sequence[Session]) -> list[DiffRow]:
    """Every function seen in ``request`` or ``baseline``, biggest ``|delta|`` first.

    Raises:
        ValueError: an empty baseline (nothing to compare with).
    """
    if not baseline:
        raise ValueError("the baseline has no profiles")
    mine, my_total = function_times(request)
    summed: dict[FunctionKey, float] = {}
    base_total = 0.0
    for session in baseline:
        times, total = function_times(session)
        base_total += total
        for key, seconds in times.items():
            summed[key] = summed.get(key, 0.0) + seconds
    count = len(baseline)
    rows = []
    for key in mine.keys() | summed.keys():
        request_s = mine.get(key, 0.0)
        baseline_s = summed.get(key, 0.0) / count
        rows.append(
            DiffRow(
                function=key[0],
                filename=key[1],
                line=key[2],
                request_ms=request_s * 1000.0,
                baseline_ms=baseline_s * 1000.0,
                delta_ms=(request_s - baseline_s) * 1000.0,
                request_share=request_s / my_total if my_total else 0.0,
                baseline_share=summed.get(key, 0.0) / base_total if base_total else 0.0,
            )
        )
    rows.sort(key=lambda row: (-abs(row.delta_ms), row.function, row.filename, row.line))
    return rows


@dataclass(slots=True)
class DiffNode:
    """One call path of a diff tree: a frame of this request and its route's mean.

    Times are in seconds. ``total`` includes the children, ``self`` is the time with this
    frame on top of the stack; ``baseline_*`` are means over the baseline's requests
    (0 where the baseline never ran this path, and the ``request_*`` are 0 where this
    request never did).
    """

    key: FunctionKey
    request_total: float = 0.0
    request_self: float = 0.0
    baseline_total: float = 0.0
    baseline_self: float = 0.0
    children: dict[FunctionKey, DiffNode] = field(default_factory=dict)

    @property
    def delta_total(self) -> float:
        """``request_total - baseline_total``: positive when this request took longer."""
        return self.request_total - self.baseline_total

    @property
    def delta_self(self) -> float:
        """``request_self - baseline_self``."""
        return self.request_self - self.baseline_self

    def child(self, key: FunctionKey) -> DiffNode:
        """The child for ``key``, created when missing."""
        node = self.children.get(key)
        if node is None:
            node = self.children[key] = DiffNode(key)
        return node


ROOT_KEY: FunctionKey = ("", "", 0)
"""The key of a diff tree's root (all samples; not a function)."""


def diff_tree(request: Session, baseline: Sequence[Session]) -> DiffNode:
    """``request``'s call tree merged with the mean call tree of ``baseline``.

    Paths are compared by function (name, file, first line), with pyinstrument's
    synthetic ``[await]``/out-of-context frames and thread roots left out, so a path is
    the same in every request of a route. An empty ``baseline`` gives zeros on its side.
    """
    root = DiffNode(ROOT_KEY)
    _add(root, request, 1.0, baseline_side=False)
    for session in baseline:
        _add(root, session, 1.0 / len(baseline), baseline_side=True)
    return root


def _add(root: DiffNode, session: Session, weight: float, *, baseline_side: bool) -> None:
    for stack, seconds in session.frame_records:
        value = seconds * weight
        node = root
        path = [node]
        for identifier in stack:
            key = _key(identifier)
            if key is not None:
                node = node.child(key)
                path.append(node)
        for step in path:
            if baseline_side:
                step.baseline_total += value
            else:
                step.request_total += value
        if baseline_side:
            node.baseline_self += value
        else:
            node.request_self += value
