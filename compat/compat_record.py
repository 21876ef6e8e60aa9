"""Per-test outcomes in one JSON file, written by the pytest plugin and the Django runner.

The file, at ``$OTELPROF_COMPAT_RESULTS``, holds ``{"finished": bool, "tests": {id:
{"outcome": ..., "message": ..., "details": ...}}}``; ``compat/run.py`` reads it. The
wrapping processes add ``<file>.stats-<pid>.json`` (apps wrapped, otelprof counters).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["BAD", "RESULTS_ENV", "WRAP_ENV", "Outcomes", "write_stats"]

RESULTS_ENV = "OTELPROF_COMPAT_RESULTS"
"""Where the outcomes go (unset: nothing is recorded)."""

WRAP_ENV = "OTELPROF_COMPAT_WRAP"
"""``apps``: wrap the apps in otelprof's middleware (and install the global SDK tracer
provider); ``provider``: only install the provider (the control run that tells its
effects from the middleware's); unset: the baseline, nothing installed."""

BAD = frozenset({"failed", "error"})
"""Outcomes that count as a failure."""

_RANK = {"passed": 0, "skipped": 1, "xfailed": 1, "xpassed": 1, "failed": 2, "error": 3}
_MAX_DETAILS = 6000


class Outcomes:
    """Test id -> outcome; a test's worst outcome over its phases (and subtests) wins."""

    def __init__(self) -> None:
        self.tests: dict[str, dict[str, str]] = {}

    def add(self, test_id: str, outcome: str, message: str = "", details: str = "") -> None:
        """Record ``outcome`` for ``test_id`` unless a worse one is recorded already."""
        known = self.tests.get(test_id)
        if known is not None and _RANK[known["outcome"]] >= _RANK[outcome]:
            return
        self.tests[test_id] = {
            "outcome": outcome,
            "message": message[:500],
            "details": details[-_MAX_DETAILS:],
        }

    def write(self, *, finished: bool) -> None:
        """Write the file named by ``$OTELPROF_COMPAT_RESULTS`` (atomically)."""
        path = os.environ.get(RESULTS_ENV)
        if not path:
            return
        _write_json(Path(path), {"finished": finished, "tests": self.tests})


def write_stats(stats: dict[str, Any]) -> None:
    """Write this process's wrapping stats beside the results file."""
    path = os.environ.get(RESULTS_ENV)
    if path:
        _write_json(Path(f"{path}.stats-{os.getpid()}.json"), stats)


def _write_json(path: Path, data: object) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
    temporary.replace(path)
