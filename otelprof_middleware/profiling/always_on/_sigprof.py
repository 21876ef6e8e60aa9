"""Always-on: ticks for an event loop on the main thread, from ``SIGPROF``.

A periodic timer on the process's CPU clock (:class:`CPUTimer`) raises ``SIGPROF``,
whose Python handler runs on the loop thread itself, in the interrupted task; a
``call_later`` tick on the loop covers the time the process is idle (requests
waiting). No second thread competes for the GIL while the loop runs. (The sampler
thread is only the watchdog here: ``_thread``.)

The handler is installed only where ``SIGPROF`` is free, and handed back when someone
else takes it: docs/always-on.md lists what was checked to be safe with it.
"""

from __future__ import annotations

import contextlib
import contextvars
import signal
import threading
import types
from typing import TYPE_CHECKING, Any

from ... import _clock
from ..._failsafe import raised_by_signal_handler
from ..._fork import PROCESS
from ._cpu_timer import CPUTimer, disarm_all
from ._registry import LoopState

if TYPE_CHECKING:
    from ._sampler import AlwaysOnSampler

__all__ = ["SigprofDriver", "pid"]


class SigprofDriver:
    """The ``SIGPROF`` handler, its timer and the loop's own tick, for one sampler.

    Args:
        sampler: the sampler it ticks.
        enabled: False: never installs the handler (the sampler thread ticks all).
    """

    def __init__(self, sampler: AlwaysOnSampler, *, enabled: bool) -> None:
        self.sampler = sampler
        self.enabled = enabled and hasattr(signal, "setitimer")
        self.cpu_timer = CPUTimer()
        self.handler_installed = False
        self.armed_pid = -1  # the process whose SIGPROF timer is armed
        self.idle_signals = 0  # signals in a row that found no request registered
        self.changing_timer = False  # in arm() or disarm() (the handler may interrupt them)
        self.main_ident = threading.main_thread().ident

    @property
    def timer_armed(self) -> bool:
        """Whether this process's SIGPROF timer is armed."""
        return self.armed_pid == pid() and self.cpu_timer.armed

    def handler_is_ours(self) -> bool:
        """Whether the process's SIGPROF handler is this driver's."""
        return bool(signal.getsignal(signal.SIGPROF) == self.on_sigprof)

    def can_drive(self, ident: int) -> bool:
        """Whether this thread's loop can be ticked by SIGPROF (installing the handler)."""
        if not self.enabled or ident != self.main_ident:
            return False
        if self.handler_installed:
            return self.handler_is_ours()
        try:
            if signal.getsignal(signal.SIGPROF) not in (signal.SIG_DFL, None):
                return False  # another profiler owns SIGPROF: leave it alone
            signal.signal(signal.SIGPROF, self.on_sigprof)
            signal.siginterrupt(signal.SIGPROF, False)  # restart interrupted system calls
        except (ValueError, OSError):
            return False
        self.handler_installed = True
        _guard_sigprof_changes()
        return True

    def drive(self, state: LoopState) -> None:
        """Make sure ``state``'s loop is ticked: the timer armed, its loop tick scheduled."""
        if not state.ticking:
            # The watchdog first: a tick landing while its thread starts (slow on a busy
            # machine) would credit the registering request with our own frames.
            self.sampler.thread.wake()
        if self.armed_pid != pid() or not self.cpu_timer.armed:
            self.arm()
        if not state.ticking:
            state.ticking = True
            state.idle_ticks = 0  # (a restart after idling must not stop at its first tick)
            state.loop.call_later(
                self.sampler.next_interval(), self.loop_tick, state, context=_EMPTY
            )

    def arm(self) -> None:
        """Arm the periodic SIGPROF timer; it is disarmed when nothing is registered.

        Periodic, not one-shot: re-arming from the handler costs a kernel tick each
        time (a 5 ms one-shot fired every 12 ms here), and the kernel quantizes any
        jitter away. A POSIX timer (:class:`CPUTimer`) where there is one: ``exec``
        deletes it, and it is not the process's one ``ITIMER_PROF``.
        """
        if self.armed_pid not in (-1, pid()):
            self.cpu_timer.forget()  # a forked child: the parent's timer is not ours
        self.changing_timer = True
        try:
            self.cpu_timer.arm(self.sampler.interval)
            self.armed_pid = pid()
            self.idle_signals = 0
        except (ValueError, OSError):
            self.armed_pid = -1
        finally:
            self.changing_timer = False

    def disarm(self) -> None:
        """Disarm this process's timer, if armed."""
        if self.armed_pid == pid():
            self.changing_timer = True
            try:
                self.armed_pid = -1
                self.cpu_timer.disarm()
            finally:
                self.changing_timer = False

    def stand_down(self) -> None:
        """Disarm the timer now, if no request is registered and this is the thread it
        drives (the main thread); the next request arms it again."""
        if threading.get_ident() == self.main_ident and not (
            self.sampler.registry.anything_registered()
        ):
            self.disarm()

    def on_sigprof(self, signum: int, frame: types.FrameType | None) -> None:
        """The handler: tick, given the interrupted frame, when anything is registered."""
        # Runs on the main thread between two bytecodes of whatever it was running:
        # never raise, never block, take no lock that code might hold.
        sampler = self.sampler
        try:
            if sampler.registry.anything_registered():
                self.idle_signals = 0
                sampler.tick(frame, None)
            else:
                self._idle_signal()
        except Exception as exc:
            if raised_by_signal_handler(exc):
                raise  # an app's signal handler ran inside ours: its exception, not ours
            sampler.pending_failures += 1

    def _idle_signal(self) -> None:
        """A signal that found no request: stop the timer once that lasts, or at once
        when no loop it drove still runs (closed right after its last request, as at the
        end of ``asyncio.run``: its idle loop ticks never come to disarm it).

        A timer left armed keeps signalling whatever the process runs next, and a signal
        is not always harmless there: trio closes its signal wakeup socket before handing
        the wakeup fd back, and CPython reports a signal in between as an unraisable
        exception (which fails a test). The next request arms it again.
        """
        self.idle_signals += 1
        if self.changing_timer or not self.cpu_timer.armed:
            return  # (interrupted arm() or disarm() itself)
        if self.idle_signals >= _IDLE_SIGNALS or not any(
            state.driven and state.loop.is_running()
            for state in list(self.sampler.registry.loops.values())
        ):
            self.disarm()

    def loop_tick(self, state: LoopState) -> None:
        """The loop's own tick: no task runs now, so it sees every request waiting."""
        sampler = self.sampler
        try:
            if not state.driven:
                state.ticking = False
                return
            if state.requests:
                state.idle_ticks = 0
            else:
                # Short requests leave the loop without one for moments at a time: keep
                # ticking (and the timer armed) through those, stop once really idle.
                state.idle_ticks += 1
                if state.idle_ticks > _LOOP_IDLE_TICKS:
                    state.ticking = False
                    registry = sampler.registry
                    if not registry.tasks and not registry.threads:
                        self.disarm()  # no timer left armed while idle: it survives exec
                    return
            if not self.handler_is_ours():
                self._hand_over(state)  # someone replaced our handler
                return
            # (skipped when a SIGPROF tick was recent: a busy loop gets those)
            if (
                state.requests
                and _clock.perf_counter() - sampler.last_tick >= 0.75 * sampler.interval
            ):
                sampler.tick(None, None)
            if state.requests and (
                self.armed_pid != pid()
                or not self.cpu_timer.armed  # (disarmed by ``disarm_all``)
                or (self.cpu_timer.survives_exec and signal.getitimer(signal.ITIMER_PROF)[0] == 0)
            ):
                self.arm()  # (other code may have set the shared ITIMER_PROF to zero)
            state.loop.call_later(sampler.next_interval(), self.loop_tick, state, context=_EMPTY)
        except Exception as exc:
            state.ticking = False
            if raised_by_signal_handler(exc):
                raise
            sampler.pending_failures += 1

    def _hand_over(self, state: LoopState) -> None:
        """Another handler took SIGPROF: stop our timer, the sampler thread takes over."""
        if not self.cpu_timer.survives_exec:
            self.disarm()  # our own POSIX timer: theirs is untouched
        else:
            with contextlib.suppress(ValueError, OSError):
                if signal.getitimer(signal.ITIMER_PROF)[1] == self.sampler.interval:
                    signal.setitimer(signal.ITIMER_PROF, 0)  # ours: not into theirs
        self.armed_pid = -1
        self.sampler.registry.stop_driving(state)
        state.ticking = False
        self.sampler.thread.wake()


_EMPTY = contextvars.Context()  # loop ticks run outside every request
_LOOP_IDLE_TICKS = 20  # empty loop ticks before the loop tick stops and the timer is disarmed
_IDLE_SIGNALS = 3  # signals in a row finding no request before the handler disarms the timer


def pid() -> int:
    """This process's id (kept current across ``fork``: :data:`PROCESS`)."""
    return PROCESS[0]


_guarded = False


def _guard_sigprof_changes() -> None:
    """Disarm our timers before any ``signal.signal(SIGPROF, ...)`` that is not ours.

    Our SIGPROF comes from POSIX timers of our own; code that sets ``SIG_DFL`` (or its
    own handler) before the loop's next tick noticed would otherwise get a tick of ours,
    and SIGPROF's default action ends the process. (A C extension calling
    ``sigaction`` directly is not seen; the loop's tick still hands over within an
    interval.)
    """
    global _guarded
    if _guarded:
        return
    _guarded = True
    original = signal.signal

    def guarded_signal(signalnum: Any, handler: Any) -> Any:
        if signalnum == signal.SIGPROF and not isinstance(
            getattr(handler, "__self__", None), SigprofDriver
        ):
            disarm_all()
        return original(signalnum, handler)

    signal.signal = guarded_signal
