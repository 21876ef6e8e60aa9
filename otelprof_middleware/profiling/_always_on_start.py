"""Always-on mode's start: the request registered with the process's sampler.

The cheapest start there is: most of these profiles are discarded as too short, so
nothing is worked out that only a kept one needs (the start stack comes from its
samples). The stop is :meth:`ProfilerCore.stop <._engine.ProfilerCore.stop>`'s, inline.
"""

from __future__ import annotations

import asyncio
import functools
import sys

from opentelemetry import trace
from opentelemetry.trace import SpanContext

from .._config import Config
from .._failsafe import count, log_failure, log_once
from .._request import RequestFacts
from ._active_profile import ActiveProfile, lazy_url
from ._green import green_threads
from ._request_profile import RequestProfile, current_request
from .always_on import AlwaysOnSampler, always_on_sampler
from .always_on import check_settings as check_always_on_settings
from .always_on._registry import LoopState, current_task

__all__ = ["ALWAYS_ON_MAX_CONCURRENT", "AlwaysOnStart", "green_threads", "in_trio_task"]


ALWAYS_ON_MAX_CONCURRENT = 1024
"""Most always-on profiles in flight on one event loop (or on the process's threads)."""


class AlwaysOnStart:
    """Starts always-on profiles; makes the process's sampler on first use.

    Args:
        config: the settings (``always_on_interval_ms``, ``always_on_sigprof``,
            ``max_samples``). In ``always_on`` mode they are checked now: loud when the
            middleware is built, not at a request.
    """

    def __init__(self, config: Config) -> None:
        self._config = config
        self._interval = config.always_on_interval_ms / 1000.0
        self._max_samples = config.max_samples
        self.sampler_instance: AlwaysOnSampler | None = None
        """The sampler once made (read directly on the hot path; else :meth:`sampler`)."""
        self.green_threads: str | None = None
        """``gevent``/``eventlet`` when this process's threads are their greenlets: no
        always-on profiles here (see :func:`green_threads`)."""
        self.refused_trio = False
        """A request ran in a trio task: counted once (see :func:`in_trio_task`)."""
        if config.enabled and config.mode == "always_on":
            check_always_on_settings(self._interval, sigprof=config.always_on_sigprof)

    def sampler(self) -> AlwaysOnSampler | None:
        """The process's always-on sampler, made (or found) on first use; None when the
        process's threads are greenlets (counted once per middleware, logged once per
        process: a test suite building an app per test must not repeat it per app)."""
        sampler = self.sampler_instance
        if sampler is None and self.green_threads is None:
            self.green_threads = green_threads()
            if self.green_threads is not None:
                count("disabled.always_on_green_threads")
                log_once(
                    "always_on.green_threads",
                    "otelprof: %s has monkey-patched threading in this process: the "
                    "always-on sampler cannot see its greenlets, so requests are not "
                    "profiled in always_on mode here. Triggered requests (the %s header) "
                    "and hook_sample_rate still get hook-mode profiles; see "
                    "docs/deployment.md.",
                    self.green_threads,
                    self._config.trigger_header,
                )
                return None
            sampler = self.sampler_instance = always_on_sampler(
                self._interval, sigprof=self._config.always_on_sigprof
            )
        return sampler

    def start(
        self, span: trace.Span, context: SpanContext, facts: RequestFacts
    ) -> ActiveProfile | None:
        """:meth:`ProfilerCore.start <._engine.ProfilerCore.start>` for the always-on
        sampler, once the request is chosen. None when the sampler holds
        :data:`ALWAYS_ON_MAX_CONCURRENT` requests or starting failed (counted)."""
        try:
            if asyncio._get_running_loop() is None and in_trio_task():
                self._refuse_trio()
                return None
            sampler = self.sampler_instance or self.sampler()
            if sampler is None:
                return None  # greenlets: nothing to sample them with (logged once)
            interval = sampler.interval  # the process's (see always_on_sampler)
            start_call_stack = None  # found in the samples of a profile that is kept
            continuous = True
            request = RequestProfile(interval, self._max_samples, start_call_stack, continuous)
            token = current_request.set(request)
            try:
                registered = sampler.register_current(request, ALWAYS_ON_MAX_CONCURRENT)
            except BaseException:
                current_request.reset(token)
                raise
        except Exception as exc:
            log_failure("profiler.start", exc)
            return None
        if not registered:
            current_request.reset(token)
            count("skipped.concurrency_cap")
            return None
        request.url_factory = functools.partial(lazy_url, self._config, facts, context)
        return ActiveProfile(request, span, context, facts, token)

    @staticmethod
    def note_producer(request: RequestProfile) -> None:
        """The response of ``request`` starts from the current task: when that is not
        the request's own (registered) task, the request waits where that task waits
        from now on (see ``ProfilerCore.response_sent_here``). A request on a thread has
        no task: nothing to note."""
        registration = request.registration
        if type(registration) is LoopState:
            task = current_task(registration.loop)
            if task is not None and task is not registration.requests.get(request):
                request.producer = task

    def _refuse_trio(self) -> None:
        """A request in a trio task gets no always-on profile: counted once per middleware,
        logged once per process."""
        if self.refused_trio:
            return
        self.refused_trio = True
        count("disabled.always_on_trio")
        log_once(
            "always_on.trio",
            "otelprof: requests run on a trio event loop here: the always-on sampler "
            "tells concurrent requests apart by their asyncio task, and trio's tasks all "
            "run on one thread, so their samples would be credited to one another. They "
            "are not profiled in always_on mode; use mode='hook' (OTELPROF_MODE=hook). "
            "Triggered requests (the %s header) and hook_sample_rate still get hook-mode "
            "profiles; see docs/always-on.md.",
            self._config.trigger_header,
        )


def in_trio_task() -> bool:
    """Whether this thread is running a trio task (hypercorn ``-k trio``, anyio's trio
    backend). Looked up in ``sys.modules``: nothing is imported, and a process without
    trio pays one dictionary lookup (only where no asyncio loop runs: WSGI threads).

    The always-on registry keys a request by its asyncio task, or else by its thread:
    every trio task of a loop shares one thread, so the last request to start took the
    thread's samples, the others' included (a 300 ms marker of one request was in
    another's profile, and none in its own).
    """
    trio = sys.modules.get("trio")
    if trio is None:
        return False
    try:
        trio.lowlevel.current_task()
    except Exception:  # RuntimeError outside trio; anything else: not trio either
        return False
    return True
