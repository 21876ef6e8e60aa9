"""Shared fixtures: every test must leave no profiler hook behind.

Most tests were written for "profile and keep every request with the hook" and say only
``sample_rate=1.0``: :func:`pytest_configure` gives them that through the environment
(explicit arguments still win). Tests of the package's own defaults (always-on mode and
the keep policy) clear those variables with the ``package_defaults`` fixture; the
security tests clear every ``OTELPROF_*`` variable (they test the defaults).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otelprof_middleware import _failsafe

from .helpers import make_provider

if TYPE_CHECKING:
    from .otlp_receiver import OtlpReceiver
    from .pyroscope_receiver import Receiver as PyroscopeReceiver

TEST_DEFAULTS = {"OTELPROF_MODE": "hook", "OTELPROF_MIN_DURATION_MS": "0"}


def pytest_configure(config: pytest.Config) -> None:
    """Set for the whole session, module-scoped server fixtures and subprocesses included."""
    for name, value in TEST_DEFAULTS.items():
        os.environ.setdefault(name, value)


@pytest.fixture
def package_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """The package's own no-argument defaults, whatever the suite's environment says."""
    for name in TEST_DEFAULTS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _no_leftover_profiler() -> Iterator[None]:
    _failsafe.reset_counters()
    yield
    assert sys.getprofile() is None, "a profiling hook was left installed on the test thread"


@pytest.fixture
def otel() -> tuple[TracerProvider, InMemorySpanExporter]:
    """A real SDK tracer provider that exports to memory: ``(provider, exporter)``."""
    return make_provider()


@pytest.fixture
def closing() -> Iterator[list[Any]]:
    """The middlewares a test built (it appends them): their writers are closed after it."""
    made: list[Any] = []
    yield made
    for middleware in made:
        middleware.core.writer.close()


@pytest.fixture
def no_writer_threads_left() -> Iterator[None]:
    """Asserts that the test stopped every writer thread it started."""
    before = {t.ident for t in threading.enumerate() if t.name == "otelprof-writer"}
    yield
    after = {t.ident for t in threading.enumerate() if t.name == "otelprof-writer" and t.is_alive()}
    assert after <= before, "a writer thread was left running"


# -- exporters and their receivers -----------------------------------------------------
# (imported when used: the receivers need opentelemetry-proto and protobuf, which only the
# exporter tests do)


@pytest.fixture
def otlp_receiver() -> Iterator[OtlpReceiver]:
    """A local OTLP/HTTP profiles receiver (``tests/otlp_receiver.py``)."""
    from .otlp_receiver import serve

    with serve() as receiver:
        yield receiver


@pytest.fixture
def pyroscope_receiver() -> Iterator[PyroscopeReceiver]:
    """A local Pyroscope ingest receiver (``tests/pyroscope_receiver.py``)."""
    from .pyroscope_receiver import serve

    with serve() as receiver:
        yield receiver


EXPORTER_THREADS = ("otelprof-otlp-profiles", "otelprof-pyroscope")


@pytest.fixture
def exporters() -> Iterator[list[Any]]:
    """The exporters a test made (it appends them): closed after it, and no exporter
    thread may be left."""
    made: list[Any] = []
    yield made
    for exporter in made:
        exporter.close(5)
    assert not [t for t in threading.enumerate() if t.name in EXPORTER_THREADS]


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """The suite's ``@pytest.mark.anyio`` tests run on asyncio only: anyio's plugin would
    run each on every installed backend, and trio is installed for the one test of trio
    itself (tests/test_always_on_trio.py, which runs its own loop)."""
    return "asyncio"
