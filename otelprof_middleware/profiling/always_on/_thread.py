"""Always-on: the sampler thread, and the watchdog of a SIGPROF-driven loop.

It ticks whatever ``SIGPROF`` does not drive: WSGI threads, worker threads of a
request on such a loop, an event loop on another thread. It needs the GIL to run: a
thread that never releases it hands it over only every ``sys.getswitchinterval()``
(5 ms by default), which caps the effective rate for CPU-bound code at about 200
samples per second.

While a ``SIGPROF``-driven loop has requests it is that loop's watchdog instead: a
loop blocked in a call that releases the GIL (``time.sleep``, a sync database driver)
uses no CPU and runs no loop tick, so nothing else would see it.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from ... import _clock
from ..._fork import PROCESS
from ._sigprof import pid

if TYPE_CHECKING:
    from ._sampler import AlwaysOnSampler

__all__ = ["SamplerThread"]


class SamplerThread:
    """The sampler's thread: started on first need, again in a forked child."""

    def __init__(self, sampler: AlwaysOnSampler) -> None:
        self.sampler = sampler
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = -1
        self._lock = threading.Lock()
        # True while the thread is (about to be) asleep on ``_wake`` for want of work:
        # only then must a registration set the event (read on every WSGI request).
        self._idle = False

    @property
    def alive(self) -> bool:
        """Whether this process's sampler thread runs."""
        thread = self._thread
        return thread is not None and self._pid == pid() and thread.is_alive()

    @property
    def started(self) -> bool:
        """Whether a thread was started and not stopped (in any process)."""
        return self._thread is not None

    def wake(self) -> None:
        """Start the thread if needed and wake it (something was registered)."""
        if self._pid != PROCESS[0] or self._thread is None:
            self.ensure()
        if self._idle:
            self._wake.set()

    def ensure(self) -> None:
        """Start the thread unless this process has it running."""
        if self._pid == pid() and self._thread is not None:
            return
        with self._lock:
            if self._pid == pid() and self._thread is not None:
                return
            self._stop = threading.Event()
            self._wake = threading.Event()
            self._idle = False
            self._thread = threading.Thread(target=self._run, name="otelprof-sampler", daemon=True)
            self._thread.start()
            self._pid = pid()

    def renew_locks(self) -> None:
        """In a forked child (see :meth:`AlwaysOnSampler.renew_locks`)."""
        self._lock = threading.Lock()

    def stop(self, timeout: float = 2.0) -> bool:
        """Stop the thread and wait up to ``timeout`` seconds for it; False when it
        still runs then (True: ended, or never started in this process)."""
        thread = self._thread
        if thread is None or self._pid != pid():
            return True
        self._stop.set()
        self._wake.set()
        thread.join(timeout)
        self._thread = None
        return not thread.is_alive()

    def _nap(self, seconds: float) -> bool:
        """Sleep ``seconds`` in watch mode; True, early, when a request that needs this
        thread was registered (or the thread is stopped), so its first moments are sampled.

        Only a registration that needs the thread wakes it (``wake``); a SIGPROF-driven
        loop's requests never do, so a busy loop is not made to hand over the GIL.
        """
        # As for idling: ``_idle`` first, then look; a registration after the look sees
        # ``_idle`` and sets the event, one before it is seen by the look.
        self._idle = True
        self._wake.clear()
        try:
            if self.sampler.registry.needs_thread():
                return True
            return self._wake.wait(seconds)
        finally:
            self._idle = False

    def _run(self) -> None:
        sampler, registry = self.sampler, self.sampler.registry
        stop, wake = self._stop, self._wake
        stalled = False
        unwatched = 0  # watchdog rounds in a row that found no request to watch
        main_cpu = _main_thread_cpu_clock()
        last_cpu = last_wall = 0.0
        busy = False
        # Woken from a nap or idling by a registration: tick at once. (Not when a
        # registration starts the thread: that thread still waits in ``Thread.start``.)
        woken = False
        while not stop.is_set():
            sampling = registry.needs_thread()
            if sampling or registry.watching():
                unwatched = 0
            # A SIGPROF-driven loop's requests do not wake this thread while the loop
            # ticks: only then must it nap and look, rather than wait to be woken.
            elif (loops := registry.has_driven_loop()) and unwatched < _WATCHDOG_IDLE_ROUNDS:
                # Between two short requests there is often nothing registered for a
                # moment: stay in watch mode (napping, see ``_nap``: a thread's request
                # wakes it) rather than idle, so a loop's next request does not have to
                # restart the watchdog.
                unwatched += 1
            else:
                # Idle, clear, then look again: a registration after the look saw
                # ``_idle`` and set the event; one before it is seen by the look. With
                # no such loop, only a registration can bring work: the thread waits for
                # it without waking (never taking the GIL meanwhile: uWSGI forks its
                # workers from C, and one forked while this thread held the GIL hung).
                self._idle = True
                wake.clear()
                if not registry.needs_thread() and not registry.watching():
                    woken = wake.wait(1.0 if loops else None)
                else:  # registered while this thread went idle (its event was cleared)
                    woken = True
                self._idle = False
                continue
            asked = sampler.next_interval()
            if woken and _clock.perf_counter() - sampler.last_tick < sampler.interval:
                woken = False  # (it slept briefly between two requests: tick as usual)
            if sampling and woken:
                # The first tick for a request that woke this thread comes at once: the
                # wake-up already waited its turn for the GIL (behind busy request
                # threads, tens of ms), and a sleep would add a second such wait before
                # anything of it is seen: a 30 ms request would end unseen.
                woken = False
                held = sampler.held_back()  # (by the ticks' CPU budget)
                if held > 0.0:
                    _clock.sleep(held)
                sampler.tick(None, held)
            elif sampling:
                _clock.sleep(asked)
                sampler.tick(None, asked)
            else:
                # Watchdog. Rarely awake while the loop ticks: every wake-up must win
                # the GIL from a busy loop.
                if stalled:
                    pause = asked
                else:
                    pause = (_WATCHDOG_BUSY if busy else _WATCHDOG_INTERVALS) * sampler.interval
                if self._nap(pause):
                    woken = True
                    continue  # a thread's request arrived: sample it from its start
                wall = _clock.perf_counter()
                cpu = _cpu_seconds(main_cpu)
                # Busy (its CPU clock ran for over half the time): SIGPROF ticks it,
                # however late the last tick looks. Blocked: the watchdog ticks.
                busy = cpu is not None and cpu - last_cpu > (wall - last_wall) / 2
                last_cpu, last_wall = cpu or 0.0, wall
                stalled = (
                    not busy
                    and wall - sampler.last_tick > 2 * sampler.interval
                    and registry.watching()
                )
                if stalled:
                    sampler.tick(None, None)
            sampler.count_failures()


_WATCHDOG_INTERVALS = 4  # the watchdog's sleep while the loop ticks, in intervals
_WATCHDOG_BUSY = 8  # its sleep while the loop thread was running on the CPU, in intervals
_WATCHDOG_IDLE_ROUNDS = 50  # rounds without requests before the watchdog idles


def _main_thread_cpu_clock() -> int | None:
    """The main thread's CPU-time clock id, where the platform has one."""
    ident = threading.main_thread().ident
    try:
        return time.pthread_getcpuclockid(ident) if ident is not None else None
    except (AttributeError, OSError):
        return None


def _cpu_seconds(clock: int | None) -> float | None:
    if clock is None:
        return None
    try:
        return time.clock_gettime(clock)
    except OSError:
        return None
