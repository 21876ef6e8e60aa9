"""Run Django's ``tests/runtests.py``, recording outcomes, with the apps wrapped if asked.

Usage: ``python compat/compat_django.py DJANGO_TESTS_DIR [runtests.py arguments]``.

Django's runner is not pytest, so this stands in for ``compat_pytest``: it installs
``otelprof_compat`` for Django when ``OTELPROF_COMPAT_WRAP=apps`` (before runtests.py
imports anything, so forked ``--parallel`` workers inherit it), makes the runner's
result class record each test's outcome, then runs runtests.py as ``__main__``.
"""

from __future__ import annotations

import os
import runpy
import sys
import unittest
from pathlib import Path
from types import TracebackType
from typing import Any

from compat_record import WRAP_ENV, Outcomes, write_stats

ExcInfo = tuple[type[BaseException], BaseException, TracebackType]

_outcomes = Outcomes()


class RecordingResult(unittest.TextTestResult):
    """Django's default text result, also recording each test's outcome."""

    def _bad(self, test: unittest.TestCase, outcome: str, err: ExcInfo) -> None:
        message = f"{err[0].__name__}: {err[1]}".splitlines()[0] if err[1] is not None else ""
        _outcomes.add(test.id(), outcome, message, self._exc_info_to_string(err, test))

    def addSuccess(self, test: unittest.TestCase) -> None:
        super().addSuccess(test)
        _outcomes.add(test.id(), "passed")

    def addFailure(self, test: unittest.TestCase, err: Any) -> None:
        super().addFailure(test, err)
        self._bad(test, "failed", err)

    def addError(self, test: unittest.TestCase, err: Any) -> None:
        super().addError(test, err)
        self._bad(test, "error", err)

    def addSkip(self, test: unittest.TestCase, reason: str) -> None:
        super().addSkip(test, reason)
        _outcomes.add(test.id(), "skipped")

    def addExpectedFailure(self, test: unittest.TestCase, err: Any) -> None:
        super().addExpectedFailure(test, err)
        _outcomes.add(test.id(), "xfailed")

    def addUnexpectedSuccess(self, test: unittest.TestCase) -> None:
        super().addUnexpectedSuccess(test)
        _outcomes.add(test.id(), "failed", "unexpected success")

    def addSubTest(self, test: unittest.TestCase, subtest: unittest.TestCase, err: Any) -> None:
        super().addSubTest(test, subtest, err)
        if err is None:
            _outcomes.add(test.id(), "passed")
        else:
            failed = issubclass(err[0], test.failureException)
            self._bad(test, "failed" if failed else "error", err)

    def stopTestRun(self) -> None:
        super().stopTestRun()
        _outcomes.write(finished=True)
        if os.environ.get(WRAP_ENV):
            import otelprof_compat

            write_stats(otelprof_compat.stats())


def main() -> None:
    """Wrap (if asked), hook the result class, run runtests.py with the other arguments."""
    tests_dir = Path(sys.argv[1]).resolve()
    wrap = os.environ.get(WRAP_ENV)
    if wrap:
        import otelprof_compat

        otelprof_compat.install(("django",) if wrap == "apps" else ())
    from django.test.runner import DiscoverRunner

    default_resultclass = DiscoverRunner.get_resultclass

    def get_resultclass(self: DiscoverRunner) -> type[unittest.TextTestResult]:
        return default_resultclass(self) or RecordingResult  # --debug-sql / --pdb win

    DiscoverRunner.get_resultclass = get_resultclass  # type: ignore[method-assign]
    os.chdir(tests_dir)
    sys.path.insert(0, str(tests_dir))
    sys.argv = [str(tests_dir / "runtests.py"), *sys.argv[2:]]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
