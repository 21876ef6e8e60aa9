"""Always-on mode's start: the request registered with the process's sampler.

The cheapest start there is: most of these profiles are discarded as too short, so
nothing is worked out that only a kept one needs (the start stack comes from its
samples). The stop is :meth:`ProfilerCore.stop <._engine.ProfilerCore.stop>`'s, inline.
"""

from __future__ import annotations

import functools

from opentelemetry import trace
from opentelemetry.trace import SpanContext

from .._config import Config
from .._failsafe import count, log_failure
from .._request import RequestFacts
from ._active_profile import ActiveProfile, lazy_url
from ._request_profile import RequestProfile, current_request
from .always_on import AlwaysOnSampler, always_on_sampler
from .always_on import check_settings as check_always_on_settings

__all__ = ["ALWAYS_ON_MAX_CONCURRENT", "AlwaysOnStart"]

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
        if config.enabled and config.mode == "always_on":
            check_always_on_settings(self._interval, sigprof=config.always_on_sigprof)

    def sampler(self) -> AlwaysOnSampler:
        """The process's always-on sampler, made (or found) on first use."""
        sampler = self.sampler_instance
        if sampler is None:
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
            sampler = self.sampler_instance or self.sampler()
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
