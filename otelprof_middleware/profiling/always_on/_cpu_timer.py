"""A periodic ``SIGPROF`` on the process's CPU clock, that ``exec`` does not carry over.

``setitimer(ITIMER_PROF)`` has two hazards for a profiler that is on by default: the timer
survives ``execve`` (the new program starts with ``SIGPROF`` at its default action and
dies of it), and there is one ``ITIMER_PROF`` per process, shared with any other
profiler. A POSIX timer (``timer_create`` on ``CLOCK_PROCESS_CPUTIME_ID``, Linux) has
neither: ``execve`` deletes it, and it is ours alone. Elsewhere (macOS has no
``timer_create``) :class:`CPUTimer` falls back to ``ITIMER_PROF``.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import sys

__all__ = ["CPUTimer", "disarm_all"]

_CLOCK_PROCESS_CPUTIME_ID = 2
_SIGEV_SIGNAL = 0
_SIGEVENT_SIZE = 64  # the kernel's sigevent: a union of at most 64 bytes


class _SigEvent(ctypes.Structure):
    _fields_ = [
        ("sigev_value", ctypes.c_void_p),
        ("sigev_signo", ctypes.c_int),
        ("sigev_notify", ctypes.c_int),
        ("_pad", ctypes.c_int * ((_SIGEVENT_SIZE - ctypes.sizeof(ctypes.c_void_p) - 8) // 4)),
    ]


class _TimeSpec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _ITimerSpec(ctypes.Structure):
    _fields_ = [("it_interval", _TimeSpec), ("it_value", _TimeSpec)]


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    # glibc >= 2.34 has it in libc itself; older ones in librt. (Not ctypes.util's
    # find_library: it runs ldconfig in a subprocess.)
    for name in (None, "librt.so.1"):
        try:
            library = ctypes.CDLL(name, use_errno=True)
            library.timer_create  # noqa: B018  (AttributeError where it is missing)
        except (OSError, AttributeError):
            continue
        library.timer_create.argtypes = [
            ctypes.c_int,
            ctypes.POINTER(_SigEvent),
            ctypes.POINTER(ctypes.c_void_p),
        ]
        library.timer_settime.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.POINTER(_ITimerSpec),
            ctypes.POINTER(_ITimerSpec),
        ]
        library.timer_delete.argtypes = [ctypes.c_void_p]
        return library
    return None


_LIBC = _libc()
_armed: set[CPUTimer] = set()  # this process's armed timers (a fork child has none)


def disarm_all() -> None:
    """Disarm every armed timer of this process, as ``setitimer(ITIMER_PROF, 0)`` does for
    the one interval timer (tests, and anything about to restore SIGPROF's default)."""
    for timer in list(_armed):
        timer.disarm()


def _timespec(seconds: float) -> _TimeSpec:
    whole = int(seconds)
    return _TimeSpec(whole, round((seconds - whole) * 1e9))


class CPUTimer:
    """Sends ``SIGPROF`` every ``interval`` seconds of the process's CPU time while armed.

    Not thread-safe: the always-on sampler arms and disarms it from the main thread.
    """

    def __init__(self) -> None:
        self._libc = _LIBC
        self._timer: ctypes.c_void_p | None = None
        self.armed = False

    @property
    def survives_exec(self) -> bool:
        """True on the ``ITIMER_PROF`` fallback: an armed timer outlives ``execve``."""
        return self._libc is None

    def arm(self, interval: float) -> None:
        """Start (or restart) the periodic signal.

        Raises:
            OSError: the kernel refused the timer.
        """
        if self._libc is None:
            signal.setitimer(signal.ITIMER_PROF, interval, interval)
            self.armed = True
            _armed.add(self)
            return
        if self._timer is None:
            event = _SigEvent()
            event.sigev_notify = _SIGEV_SIGNAL
            event.sigev_signo = signal.SIGPROF
            timer = ctypes.c_void_p()
            if self._libc.timer_create(
                _CLOCK_PROCESS_CPUTIME_ID, ctypes.byref(event), ctypes.byref(timer)
            ):
                raise OSError(ctypes.get_errno(), "timer_create failed")
            self._timer = timer
        spec = _ITimerSpec(_timespec(interval), _timespec(interval))
        if self._libc.timer_settime(self._timer, 0, ctypes.byref(spec), None):
            raise OSError(ctypes.get_errno(), "timer_settime failed")
        self.armed = True
        _armed.add(self)

    def disarm(self) -> None:
        """Stop the signal (and free the POSIX timer). Never raises."""
        self.armed = False
        _armed.discard(self)
        if self._libc is None:
            with contextlib.suppress(ValueError, OSError):
                signal.setitimer(signal.ITIMER_PROF, 0)
            return
        timer, self._timer = self._timer, None
        if timer is not None:
            self._libc.timer_delete(timer)

    def forget(self) -> None:
        """In a forked child: the parent's POSIX timer is not the child's; drop the id."""
        if self._libc is not None:
            self._timer = None
            self.armed = False
            _armed.discard(self)
