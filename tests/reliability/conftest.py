"""Fixtures of the reliability suite; the fault ledger goes to test-artifacts/."""

from __future__ import annotations

import faulthandler
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .harness import LEDGER, Harness, Kind, make_harness

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "reliability"


@pytest.fixture(autouse=True)
def _no_hang(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that hangs dumps every thread's stack and ends the run, instead of stalling."""
    limit = 120.0
    if request.node.get_closest_marker("soak"):
        limit += float(os.environ.get("OTELPROF_SOAK_SECONDS", "600")) + 300
    faulthandler.dump_traceback_later(limit, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(params=["asgi", "wsgi"])
def kind(request: pytest.FixtureRequest) -> Kind:
    """Both adapters: every fault is tried against ASGI and WSGI."""
    value: Kind = request.param
    return value


@pytest.fixture
def harnesses() -> Iterator[Callable[..., Harness]]:
    """Makes harnesses and closes them (writer, server threads) after the test."""
    made: list[Harness] = []

    def make(kind: Kind, store: Any = None, **settings: Any) -> Harness:
        harness = make_harness(kind, store, **settings)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.close()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not LEDGER:
        return
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "faults.json").write_text(json.dumps(LEDGER, indent=1) + "\n")
