from __future__ import annotations

import signal
import types

import pytest

from otelprof_middleware import _clock, _failsafe
from otelprof_middleware._failsafe import fail_open


class _AppTimeout(Exception):
    """What an app's alarm-based timeout raises from its signal handler."""


def _app_timeout(signum: int, frame: types.FrameType | None) -> None:
    raise _AppTimeout


def test_an_apps_signal_handler_exception_is_not_swallowed() -> None:
    """A signal handler of the app's can run between two bytecodes of the middleware's own
    code (an alarm landing in our span, keep or writer step). What it raises is the app's,
    and reaches the app as it would without us: fail-open is for our own failures."""
    previous = signal.signal(signal.SIGUSR1, _app_timeout)
    try:
        with pytest.raises(_AppTimeout), fail_open("writer.submit"):
            signal.raise_signal(signal.SIGUSR1)  # its handler runs here, inside our block
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert _failsafe.snapshot().get("failed.writer.submit", 0) == 0


def test_our_own_failures_are_still_swallowed() -> None:
    previous = signal.signal(signal.SIGUSR1, _app_timeout)  # installed, not raising here
    try:
        with fail_open("writer.submit"):
            raise RuntimeError("ours")
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert _failsafe.snapshot().get("failed.writer.submit", 0) == 1


def test_telling_a_signal_handlers_exception_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """It runs inside the hooks' own ``except`` blocks, also while the interpreter
    finalizes (a hook left on by a response collected at exit), when module globals may
    be None already: it must answer, not raise out of the hook."""
    monkeypatch.setattr(signal, "valid_signals", None)
    try:
        raise RuntimeError("ours")
    except RuntimeError as exc:
        assert not _failsafe.raised_by_signal_handler(exc)


def test_a_clock_that_went_back_does_not_silence_a_stage_for_good(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A failure logged under a frozen clock (freezegun patches ``time.monotonic``, years
    ahead) silenced that stage until the real clock caught up: never, in that process."""
    import time

    from otelprof_middleware import _failsafe

    real = time.monotonic()
    now = [real + 1.7e9]
    monkeypatch.setattr(_clock, "monotonic", lambda: now[0])
    with caplog.at_level("WARNING"):
        _failsafe.log_failure("store.put", OSError("frozen"))
        now[0] = real + 120.0
        _failsafe.log_failure("store.put", OSError("real again"))
    said = [r.getMessage() for r in caplog.records if "store.put failed" in r.getMessage()]
    assert len(said) == 2, said
