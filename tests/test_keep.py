"""The keep policy: slow for its route, failed, or triggered, under a budget."""

from __future__ import annotations

import pytest

from otelprof_middleware import _clock, counters
from otelprof_middleware.profiling._keep_policy import (
    ERROR,
    MIN_DURATION,
    MIN_HISTORY,
    SLOW,
    TRIGGERED,
    KeepPolicy,
)

MS = 0.001


def policy(**overrides: float | None) -> KeepPolicy:
    settings: dict[str, float | None] = {
        "min_duration_ms": None,
        "slow_floor_ms": 50.0,
        "keep_per_second": 5.0,
    }
    settings.update(overrides)
    return KeepPolicy(**settings)  # type: ignore[arg-type]


def reason(
    keep: KeepPolicy,
    seconds: float,
    *,
    route: str = "/items/{id}",
    status: int = 200,
    failed: bool = False,
    triggered: bool = False,
) -> str | None:
    return keep.reason(
        route=route, duration=seconds, status_code=status, failed=failed, triggered=triggered
    )


def warm(keep: KeepPolicy, route: str, seconds: float, count: int = 64) -> None:
    for _ in range(count):
        reason(keep, seconds, route=route)


def test_a_request_slow_for_its_own_route_is_kept() -> None:
    keep = policy(keep_per_second=1000.0)
    warm(keep, "/fast", 3 * MS)
    warm(keep, "/slow", 400 * MS)
    assert keep.usual_ms("/fast") == pytest.approx(3.0)
    assert reason(keep, 300 * MS, route="/fast") == SLOW  # 100x its route's usual
    assert reason(keep, 300 * MS, route="/slow") is None  # usual for that route
    assert reason(keep, 450 * MS, route="/slow") == SLOW
    # Above its route's usual but under the floor: not worth a profile.
    assert reason(keep, 20 * MS, route="/fast") is None


def test_a_route_without_history_is_judged_by_the_floor_alone() -> None:
    keep = policy(keep_per_second=1000.0)
    assert keep.usual_ms("/new") is None
    assert reason(keep, 49 * MS, route="/new") is None
    assert reason(keep, 51 * MS, route="/new") == SLOW
    warm(keep, "/new", 60 * MS, count=MIN_HISTORY)
    assert keep.usual_ms("/new") == pytest.approx(60.0)  # trusted from now on
    assert reason(keep, 55 * MS, route="/new") is None


def test_failures_are_kept_whatever_their_duration() -> None:
    keep = policy()
    assert reason(keep, 1 * MS, status=500) == ERROR
    assert reason(keep, 1 * MS, status=503) == ERROR
    assert reason(keep, 1 * MS, failed=True) == ERROR  # raised, even behind a 200
    assert reason(keep, 1 * MS, status=404) is None


def test_triggered_profiles_are_always_kept_and_cost_no_budget() -> None:
    keep = policy(keep_per_second=0.1)  # one every ten seconds: a burst of one
    assert reason(keep, 1 * MS, status=500) == ERROR
    assert reason(keep, 1 * MS, status=500) is None  # budget spent
    for _ in range(20):
        assert reason(keep, 1 * MS, triggered=True) == TRIGGERED


def test_a_budget_of_zero_keeps_only_triggered_profiles() -> None:
    keep = policy(keep_per_second=0.0)
    warm(keep, "/fast", 3 * MS)
    assert [reason(keep, 1 * MS, status=500) for _ in range(10)] == [None] * 10
    assert reason(keep, 300 * MS, route="/fast") is None  # slow, but no budget
    assert reason(keep, 1 * MS, triggered=True) == TRIGGERED
    assert counters()["discarded.over_budget"] == 11


def test_each_discarded_profile_is_counted_once() -> None:
    keep = policy(keep_per_second=1.0)  # a burst of two
    warm(keep, "/fast", 3 * MS, count=30)  # 30 fast: not kept
    failures = [reason(keep, 1 * MS, route="/fast", status=500) for _ in range(5)]
    assert failures.count(ERROR) == 2
    snapshot = counters()
    assert snapshot["discarded.over_budget"] == 3
    assert snapshot["discarded.not_kept"] == 30  # the over-budget failures are not here too
    assert reason(keep, 199 * MS, route="/fast") is None  # slow: budget spent
    assert counters()["discarded.over_budget"] == 4
    assert counters()["discarded.not_kept"] == 30
    assert (
        policy(min_duration_ms=200.0).reason(
            route="", duration=0.1, status_code=500, failed=False, triggered=False
        )
        is None
    )
    assert counters()["discarded.not_kept"] == 31


def test_the_budget_bounds_kept_profiles_per_second() -> None:
    keep = policy(keep_per_second=5.0)
    kept = [reason(keep, 1 * MS, status=500) for _ in range(100)]
    assert kept.count(ERROR) == 10  # a burst of two seconds' worth, then nothing
    assert counters()["discarded.over_budget"] == 90


def test_explicit_min_duration_replaces_the_policy() -> None:
    keep = policy(min_duration_ms=200.0, keep_per_second=0.0)
    assert reason(keep, 199 * MS, status=500) is None  # the threshold alone decides
    assert [reason(keep, 250 * MS) for _ in range(50)] == [MIN_DURATION] * 50  # no budget
    assert (
        policy(min_duration_ms=0.0).reason(
            route="", duration=0.0, status_code=200, failed=False, triggered=False
        )
        == MIN_DURATION
    )


def test_a_clock_that_went_back_leaves_the_budget_working(monkeypatch: pytest.MonkeyPatch) -> None:
    """A test frozen by freezegun (which patches ``time.monotonic``) put the clock years
    ahead; back on the real clock, the refill came out hugely negative, and no failed or
    slow request was kept again in that process (a session-scoped app in a suite)."""
    import time

    real = time.monotonic()
    now = [real]
    monkeypatch.setattr(_clock, "monotonic", lambda: now[0])
    keep = policy(keep_per_second=5.0)
    now[0] = real + 1.7e9  # frozen at a date: "monotonic" is that date's epoch seconds
    assert reason(keep, 1 * MS, status=500) == ERROR
    now[0] = real + 1.0  # unfrozen: the real clock again, far behind
    assert reason(keep, 1 * MS, status=500) == ERROR
    now[0] = real + 30.0
    kept = [reason(keep, 1 * MS, status=500) for _ in range(20)]
    assert kept.count(ERROR) == 10  # a full burst again
