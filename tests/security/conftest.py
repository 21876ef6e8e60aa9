"""Clean OTELPROF_* environment per test; report what the security tests did at the end."""

from __future__ import annotations

import os

import pytest

from ._support import TALLY


@pytest.fixture(autouse=True)
def _no_otelprof_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Defaults are under test here: no OTELPROF_* variable of the caller may change them."""
    for name in list(os.environ):
        if name.startswith("OTELPROF_"):
            monkeypatch.delenv(name)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TALLY:
        figures = ", ".join(f"{count} {what}" for what, count in sorted(TALLY.items()))
        terminalreporter.write_line(f"security tests: {figures}")
