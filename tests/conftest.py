"""Shared fixtures: every test must leave no profiler hook behind."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator

import pytest

from otelprof_middleware import _failsafe


@pytest.fixture(autouse=True)
def _no_leftover_profiler() -> Iterator[None]:
    _failsafe.reset_counters()
    yield
    assert sys.getprofile() is None, "a profiling hook was left installed on the test thread"


@pytest.fixture
def no_writer_threads_left() -> Iterator[None]:
    """Asserts that the test stopped every writer thread it started."""
    before = {t.ident for t in threading.enumerate() if t.name == "otelprof-writer"}
    yield
    after = {t.ident for t in threading.enumerate() if t.name == "otelprof-writer" and t.is_alive()}
    assert after <= before, "a writer thread was left running"
