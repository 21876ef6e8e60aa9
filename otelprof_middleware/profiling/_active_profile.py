"""A request being profiled (:class:`ActiveProfile`) and where its profile's link points.

The link (``<base URL>/debug/profile/<trace id>?span_id=<span id>``) is known from the
start: the request's log records may carry it (:mod:`otelprof_middleware.logging`), the
span gets it when the profile is kept. It is made only when first read.
"""

from __future__ import annotations

from contextvars import Token
from dataclasses import dataclass, field

from opentelemetry import trace
from opentelemetry.trace import SpanContext, format_span_id, format_trace_id

from .. import _clock
from .._config import Config
from .._net import safe_host
from .._request import RequestFacts, normalise_method
from ._request_profile import RequestProfile
from ._span import profile_url
from ._thread_hook import ThreadHook

__all__ = ["ActiveProfile", "base_url_of", "lazy_url"]


@dataclass(slots=True)
class ActiveProfile:
    """A request being profiled.

    Made on every profiled request: the always-on start passes the first five fields in
    order (a class called with keyword arguments builds a dict of them first).
    """

    request: RequestProfile
    span: trace.Span
    context: SpanContext
    facts: RequestFacts
    token: Token[RequestProfile | None] | None
    hook: ThreadHook | None = field(default=None)  # the thread's; None: always-on, or a loop
    finished: bool = field(default=False)
    duration: float = field(default=0.0)  # seconds, set when stopped
    triggered: bool = field(default=False)  # asked for by the trigger header

    def app_returned(self) -> None:
        """The adapter's call of the app returned (or raised), on the request's thread: the
        always-on sampler credits the time up to here exactly (WSGI; the body it returned
        may still run app code while the server iterates it, which is sampled as usual)."""
        self.request.left_app_at = _clock.perf_counter()

    @property
    def method(self) -> str:
        """The request's method, normalised (worked out when asked: for kept profiles)."""
        return normalise_method(self.facts.method)

    @property
    def trace_id(self) -> str:
        """The trace id in hex (formatted when asked: most profiles are never kept)."""
        return format_trace_id(self.context.trace_id)

    @property
    def span_id(self) -> str:
        """The span id in hex."""
        return format_span_id(self.context.span_id)


def base_url_of(config: Config, facts: RequestFacts) -> str:
    """The start of the request's profile links: ``public_url``, or its own scheme, host
    (the Host header if usable, else the server's address) and mount point."""
    host = safe_host(facts.host_header()) or safe_host(facts.server_address())
    return config.base_url(facts.scheme, host, facts.root_path)


def lazy_url(config: Config, facts: RequestFacts, context: SpanContext) -> str:
    """The URL a request's profile will have if kept, for its log records
    (otelprof_middleware.logging).

    Each start sets ``request.url_factory = functools.partial(lazy_url, config, facts,
    context)``: made only if a log record asks, everything, the hex ids included. (The
    context, not the :class:`ActiveProfile`: no reference cycle for the GC.)
    """
    return profile_url(
        base_url_of(config, facts),
        format_trace_id(context.trace_id),
        format_span_id(context.span_id),
    )
