"""Which finished profiles to keep, and why: the policy that needs no threshold.

With no ``min_duration_ms`` set, a profile is kept when its request

* was **triggered** (the debug header): always;
* **failed** (status 5xx, or the app raised);
* was **slow for its own route**: slower than the route's recent 95th percentile once
  the route has history, and never faster than an absolute floor (``slow_floor_ms``);

the last two under a **budget** of kept profiles per second per process (a token
bucket), so the background writer's cost stays bounded at any load. An explicit
``min_duration_ms`` replaces the policy: keep every profile at least that long.

Every request's duration feeds its route's history, so this runs on every profiled
request: a dict lookup and a list store, the percentile worked out every few requests.
"""

from __future__ import annotations

import threading

from .. import _clock
from .._failsafe import tally

__all__ = ["ERROR", "MIN_DURATION", "SLOW", "TRIGGERED", "KeepPolicy"]

SLOW = "slow"
ERROR = "error"
TRIGGERED = "triggered"
MIN_DURATION = "min_duration"

HISTORY = 128
"""Recent durations remembered per route."""
MIN_HISTORY = 20
"""Requests a route must have had before its percentile is trusted; until then the
floor alone decides."""
_REFRESH_EVERY = 16
_NO_HISTORY = float("inf")
_count_over_budget = tally("discarded.over_budget")
_count_not_kept = tally("discarded.not_kept")
MAX_ROUTES = 2000
"""Routes tracked at most (route templates, so few; unmatched paths share ``""``)."""


class _RouteHistory:
    """The recent durations of one route and their 95th percentile."""

    __slots__ = ("count", "durations", "p95")

    def __init__(self) -> None:
        self.durations: list[float] = []
        self.count = 0
        self.p95 = _NO_HISTORY

    def add(self, duration: float) -> None:
        durations = self.durations
        if len(durations) < HISTORY:
            durations.append(duration)
        else:
            durations[self.count % HISTORY] = duration
        self.count += 1
        if self.count == MIN_HISTORY or (
            self.count > MIN_HISTORY and self.count % _REFRESH_EVERY == 0
        ):
            ordered = sorted(durations)
            self.p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]


class KeepPolicy:
    """Decides, for each finished profile, whether it is kept and for which reason.

    Args:
        min_duration_ms: when not None, keep exactly the profiles at least this long
            (reason ``min_duration``), and nothing else applies.
        slow_floor_ms: a request is never "slow" below this.
        keep_per_second: the budget of error and slow profiles kept per second (burst:
            two seconds' worth, at least one profile; 0 keeps none); triggered and
            ``min_duration`` profiles are not counted.

    Each discarded profile is counted once: ``discarded.over_budget`` when the budget
    was spent, else ``discarded.not_kept``.
    """

    def __init__(
        self,
        *,
        min_duration_ms: float | None,
        slow_floor_ms: float,
        keep_per_second: float,
    ) -> None:
        self._min_duration = None if min_duration_ms is None else min_duration_ms / 1000.0
        self._floor = slow_floor_ms / 1000.0
        self._rate = keep_per_second
        # At least one token, so that a rate under one every two seconds keeps anything.
        self._burst = max(1.0, 2.0 * keep_per_second) if keep_per_second > 0 else 0.0
        self._tokens = self._burst
        self._refilled_at = _clock.monotonic()
        self._lock = threading.Lock()
        self._routes: dict[str, _RouteHistory] = {}

    def reason(
        self, *, route: str, duration: float, status_code: int, failed: bool, triggered: bool
    ) -> str | None:
        """Why this profile is kept, or None to discard it (counted). ``duration`` in
        seconds."""
        if self._min_duration is not None:
            if duration >= self._min_duration:
                return MIN_DURATION
            _count_not_kept()
            return None
        history = self._routes.get(route)
        if history is None:
            if len(self._routes) >= MAX_ROUTES:
                self._routes.clear()  # routes are templates: only a misuse gets here
            history = self._routes[route] = _RouteHistory()
        usual = history.p95  # the route's history before this request
        history.add(duration)
        if triggered:
            return TRIGGERED
        if failed or status_code >= 500:
            return ERROR if self._spend() else None
        # Slow: above the floor, and above the route's usual (infinite, so never,
        # until the route has history: then the floor alone decides).
        if duration >= self._floor and (duration > usual or usual == _NO_HISTORY):
            return SLOW if self._spend() else None
        _count_not_kept()
        return None

    def usual_ms(self, route: str) -> float | None:
        """The route's current 95th percentile in milliseconds (None: too little history)."""
        history = self._routes.get(route)
        if history is None or history.p95 == _NO_HISTORY:
            return None
        return history.p95 * 1000.0

    def _spend(self) -> bool:
        """Take one token from the budget; False when it is spent."""
        with self._lock:
            now = _clock.monotonic()
            # A clock that went back (freezegun and the like patch time.monotonic in a
            # test, and the real clock is far behind the frozen one after it) adds
            # nothing, and does not take the budget away for good.
            elapsed = max(0.0, now - self._refilled_at)
            self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
            self._refilled_at = now
            if self._tokens < 1.0:
                _count_over_budget()
                return False
            self._tokens -= 1.0
            return True
