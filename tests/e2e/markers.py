"""64 uniquely named marker functions that spin for a known wall-clock time.

Each ``marker_<n>`` is a distinct function (its own name in every profile), so a profile
can be checked for exactly which request's work it holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable

COUNT = 64


def _spin(seconds: float) -> float:
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        sum(range(40))
    return time.perf_counter() - start


def _make(n: int) -> Callable[[float], float]:
    namespace: dict[str, object] = {"_spin": _spin}
    source = f"def marker_{n}(seconds):\n    return _spin(seconds)\n"
    exec(compile(source, __file__, "exec"), namespace)
    function = namespace[f"marker_{n}"]
    assert callable(function)
    return function  # type: ignore[return-value]


MARKERS: dict[int, Callable[[float], float]] = {n: _make(n) for n in range(COUNT)}
