"""Keeping a stopped profile: the link on the span, then the writer and the exporter.

Which profiles are kept is :mod:`._keep_policy`'s decision; this is what keeping one
does. Each step fails open on its own: a span that cannot take the link still gets its
profile written, a full writer queue still lets the exporter have it.
"""

from __future__ import annotations

import re

from opentelemetry import trace
from pyinstrument.session import Session

from .._config import Config
from .._failsafe import fail_open
from .._record import ProfileSummary
from ..exporters import ProfileExporter, SpanFacts
from ._active_profile import ActiveProfile, base_url_of
from ._span import set_profile_attributes
from ._writer import ProfileWriter

__all__ = ["Keeper"]

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MAX_SERVICE_LENGTH = 200


class Keeper:
    """Keeps stopped profiles: span link, summary, writer, exporter.

    Args:
        config: the settings (the links' base URL, the configured service name).
        writer: the background writer that stores kept profiles.
        exporter: where kept profiles are sent too (Pyroscope, OTLP); None: nowhere.
        tracer_provider: the middleware's own provider, if it was given one; else the
            global one is used. Its resource stands in for the span's when the span has
            none (not recorded: a triggered profile of an unsampled trace).
    """

    def __init__(
        self,
        config: Config,
        writer: ProfileWriter,
        exporter: ProfileExporter | None,
        *,
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        self.config = config
        self.writer = writer
        self.exporter = exporter
        self.tracer_provider = tracer_provider

    def keep(self, active: ActiveProfile, *, status_code: int, route: str, reason: str) -> None:
        """Keep a stopped profile: span link, then the writer (and exporter).

        Raises:
            Exception: only when the link's base URL cannot be worked out (the caller
                fails open); every later step fails open here.
        """
        request = active.request
        duration = active.duration
        base_url = base_url_of(self.config, active.facts)
        with fail_open("span"):
            if active.span.is_recording():
                set_profile_attributes(
                    active.span, active.trace_id, active.span_id, base_url, has_route=bool(route)
                )
        session: Session | None = None
        with fail_open("writer.submit"):
            summary = ProfileSummary(
                trace_id=active.trace_id,
                span_id=active.span_id,
                method=active.method,
                route=route,
                status_code=status_code,
                duration_ms=round(duration * 1000.0, 3),
                start_time=request.start_wall,
                sample_count=request.samples,
                mode="always_on" if request.continuous else "hook",
                interval_ms=round(request.interval * 1000.0, 3),
                kept_reason=reason,
                service=self.service_name(active.span),
            )
            how = "always-on sampler" if request.continuous else "pyinstrument hook"
            request.description = (
                f"{active.method} {route or '(unmatched route)'}"
                f" · {how}, interval {summary.interval_ms:g} ms"
            )
            session = request.to_session(duration)
            if not self.writer.submit(summary, session):
                request.url = None  # dropped (queue full): no link for later log records
        exporter = self.exporter
        if exporter is not None and session is not None:
            with fail_open("exporter.submit"):
                # The exporter's attributes (pyroscope.profile.id) only if it took the
                # profile, and while the span is still open.
                accepted = exporter.submit(summary, session, self.span_facts(active.span))
                if accepted and active.span.is_recording():
                    active.span.set_attributes(exporter.span_attributes(summary))

    def span_facts(self, span: trace.Span) -> SpanFacts:
        """The span's facts; the resource is the provider's when the span has none."""
        if isinstance(span, trace.NonRecordingSpan):
            return SpanFacts.of(span, self.tracer_provider or trace.get_tracer_provider())
        return SpanFacts.of(span)

    def service_name(self, span: trace.Span) -> str:
        """The service a profile belongs to: the span's ``service.name`` (what trace UIs
        show), else the configured one (``OTELPROF_SERVICE_NAME``), else ``unknown_service``."""
        name = self.span_facts(span).service_name
        if not name or name.startswith("unknown_service"):
            name = self.config.resolved_service_name
        return _CONTROL.sub(" ", name)[:_MAX_SERVICE_LENGTH]
