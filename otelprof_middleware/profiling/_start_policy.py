"""Which requests to profile, decided at request start, cheapest test first (DESIGN.md).

1. disabled, or path excluded (the viewer's own routes always) -> no;
2. trigger header, when allowed -> yes;
3. trace not sampled (span not recording) -> no;
4. deterministic by trace id at ``sample_rate`` (same rule as OTel's TraceIdRatioBased);
5. the concurrency cap is applied by the caller when it starts the profile.
"""

from __future__ import annotations

import hmac

from .._config import DEBUG_PREFIX, Config
from .._net import is_loopback

__all__ = ["StartPolicy"]

_TRACE_ID_LOW_BITS = (1 << 64) - 1


class StartPolicy:
    """The per-request decision, with everything that can be precomputed done in ``__init__``.

    Args:
        config: the middleware's settings.
    """

    __slots__ = (
        "_always_on",
        "_bound",
        "_enabled",
        "_excluded",
        "_hook_bound",
        "_token",
        "trigger_header",
        "triggers_allowed",
    )

    def __init__(self, config: Config) -> None:
        self._enabled = config.enabled
        self._excluded = (DEBUG_PREFIX, *config.exclude_paths)
        # The same bound as opentelemetry.sdk.trace.sampling.TraceIdRatioBased, so a
        # rate shared by every service in a trace profiles the same traces everywhere.
        self._bound = round(config.sample_rate * (1 << 64))
        self._always_on = config.mode == "always_on"
        self._hook_bound = round(config.hook_sample_rate * (1 << 64)) if self._always_on else 0
        self._token = config.debug_token.encode() if config.debug_token else None
        self.trigger_header = config.trigger_header.encode("latin-1")
        # Triggers: with a token, only a request carrying it; without one, only in
        # development (the viewer is on and therefore loopback-only).
        self.triggers_allowed = self._token is not None or config.debug_route

    def is_excluded(self, path: str) -> bool:
        """True for paths never profiled: when disabled, the viewer, ``exclude_paths``."""
        if not self._enabled:
            return True
        if not path.startswith(self._excluded):  # one C call for the common case
            return False
        for prefix in self._excluded:
            if path == prefix or (path.startswith(prefix) and path[len(prefix)] == "/"):
                return True
        return False

    def is_triggered(self, header_value: bytes | None, client_host: str | None) -> bool:
        """True when the trigger header asks for a profile and triggers are allowed.

        With a debug token, the header must carry it. Without one (development, viewer
        on), only loopback clients may trigger, as only they may open the viewer.
        """
        if header_value is None or not self.triggers_allowed:
            return False
        if self._token is None:
            return is_loopback(client_host)
        return hmac.compare_digest(header_value.strip(), self._token)

    def is_sampled(self, trace_id: int, is_recording: bool) -> bool:
        """Steps 3 and 4: only recorded traces, deterministically by trace id."""
        return is_recording and (trace_id & _TRACE_ID_LOW_BITS) < self._bound

    def choose(
        self, trace_id: int, is_recording: bool, trigger: bytes | None, client_host: str | None
    ) -> str | None:
        """Which profiler a request gets: ``"hook"``, ``"always_on"`` or None (none).

        A triggered request always gets the detailed hook. In ``always_on`` mode,
        ``hook_sample_rate`` of the recorded traces get the hook too (decided first, so a
        request is never profiled twice) and ``sample_rate`` of them the sampler thread.
        """
        if trigger is not None and self.is_triggered(trigger, client_host):
            return "hook"
        if not is_recording:
            return None
        low = trace_id & _TRACE_ID_LOW_BITS
        if self._always_on:
            if low < self._hook_bound:
                return "hook"
            return "always_on" if low < self._bound else None
        return "hook" if low < self._bound else None
