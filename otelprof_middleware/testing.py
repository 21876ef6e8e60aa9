"""Tear-down of the package's process-wide state, for the test suites of apps that use it.

The middleware keeps a few things per process, not per instance: the always-on sampler
(with its signal handler, timer and thread), the failure counters and the log rate
limiter. A test suite that builds apps with different settings can start each test from
a clean process state::

    import pytest
    from otelprof_middleware import testing

    @pytest.fixture(autouse=True)
    def _otelprof_clean() -> None:
        testing.reset()
"""

from __future__ import annotations

from . import _always_on, _failsafe

__all__ = ["reset"]


def reset() -> None:
    """Stop and forget the always-on sampler (its timer disarmed, its thread ended) and
    clear the counters and the log rate limiter. Middlewares built afterwards start
    afresh; a middleware still serving requests starts a new sampler when it needs one."""
    _always_on.reset_for_tests()
    _failsafe.reset_counters()
