"""pytest plugin (``-p compat_pytest``): record outcomes; wrap the apps when asked.

Loaded in every run of the Starlette, FastAPI and Flask suites. With
``OTELPROF_COMPAT_WRAP=apps`` it installs ``otelprof_compat`` (every Starlette/FastAPI
and Flask app gets otelprof's middleware) in each process, xdist workers included; with
``provider`` only the global tracer provider; the baseline run loads it only to record
outcomes. Outcomes are recorded in the controller.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from compat_record import WRAP_ENV, Outcomes, write_stats

_outcomes = Outcomes()
_wrap = os.environ.get(WRAP_ENV, "")


def pytest_configure(config: pytest.Config) -> None:
    """Wrap the frameworks (every process); record outcomes (controller only)."""
    if _wrap:
        import otelprof_compat

        otelprof_compat.install(("starlette", "flask") if _wrap == "apps" else ())
    if not hasattr(config, "workerinput"):
        config.pluginmanager.register(_Recorder(), "compat_recorder")


def pytest_report_header(config: pytest.Config) -> str:
    """Say in the header whether (and how) the apps are wrapped."""
    if not _wrap:
        return "otelprof compat: baseline (no middleware)"
    if _wrap == "provider":
        return "otelprof compat: global SDK TracerProvider only (no middleware)"
    import otelprof_compat

    return f"otelprof compat: apps wrapped, settings {otelprof_compat.settings()}"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Each wrapping process leaves its stats (apps wrapped, otelprof counters)."""
    if _wrap:
        import otelprof_compat

        write_stats(otelprof_compat.stats())


class _Recorder:
    """Folds the phase reports of each test into one outcome; writes them at the end."""

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            _outcomes.add(report.nodeid, "error", "collection error", report.longreprtext)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        xfail: Any = getattr(report, "wasxfail", None)
        if report.passed:
            outcome = "xpassed" if xfail is not None and report.when == "call" else "passed"
        elif report.skipped:
            outcome = "xfailed" if xfail is not None else "skipped"
        else:
            outcome = "failed" if report.when == "call" else "error"
        message = ""
        crash = getattr(report.longrepr, "reprcrash", None)
        if outcome in ("failed", "error"):
            message = crash.message if crash is not None else report.longreprtext[-300:]
            if report.when != "call":
                message = f"[{report.when}] {message}"
        _outcomes.add(report.nodeid, outcome, message, report.longreprtext if message else "")

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        _outcomes.write(finished=True)
