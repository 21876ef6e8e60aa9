"""Optional sinks that receive each kept profile besides the store.

The core calls an exporter right after it keeps a profile, on the request's thread,
*before* the server span ends::

    accepted = exporter.submit(summary, session, SpanFacts.of(span))
    if accepted and span.is_recording():
        span.set_attributes(exporter.span_attributes(summary))

``submit`` must never block and never raise for delivery problems: it queues the
profile for its own background thread (bounded; drop and count when full) and says
whether it was queued. Only then are the exporter's span attributes set, so a span
never points at a profile that was dropped on the spot. A profile that is queued but
whose delivery fails later is counted (see the exporter's docs); its attribute stays.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from opentelemetry import trace
from pyinstrument.session import Session

from .._record import ProfileSummary

__all__ = ["ProfileExporter", "SpanFacts", "check_exporter_settings", "open_exporter"]


@dataclass(frozen=True, slots=True)
class SpanFacts:
    """What an exporter may want from the server span, read on the request's thread.

    Attributes:
        name: the span's name (e.g. ``GET /items/{item_id}``), ``""`` when unreadable.
        service_name: the ``service.name`` of the span's resource, if any.
        resource: the attributes of the span's resource (the app's ``TracerProvider``'s).
    """

    name: str = ""
    service_name: str | None = None
    resource: Mapping[str, object] = field(default_factory=dict, compare=False)

    @classmethod
    def of(cls, span: trace.Span, provider: trace.TracerProvider | None = None) -> SpanFacts:
        """Read the facts of an SDK span; API-only spans give empty facts.

        Args:
            span: the server span.
            provider: whose resource to take when the span has none: a span the sampler
                did not record (a triggered profile of an unsampled trace) is an API
                ``NonRecordingSpan``, but the app's ``TracerProvider`` has a resource.
        """
        name = getattr(span, "name", "")
        resource = getattr(span, "resource", None)
        if resource is None and provider is not None:
            resource = getattr(provider, "resource", None)
        attributes = getattr(resource, "attributes", None)
        service = attributes.get("service.name") if isinstance(attributes, Mapping) else None
        return cls(
            name=name if isinstance(name, str) else "",
            service_name=service if isinstance(service, str) and service else None,
            resource=attributes if isinstance(attributes, Mapping) else {},
        )


class ProfileExporter(Protocol):
    """A sink for kept profiles (e.g. :class:`~.pyroscope.PyroscopeExporter`)."""

    def submit(self, summary: ProfileSummary, session: Session, span: SpanFacts) -> bool:
        """Queue one kept profile for export; never blocks.

        Returns:
            True when queued; False when dropped (queue full, closed), counted.
        """
        ...

    def span_attributes(self, summary: ProfileSummary) -> Mapping[str, str]:
        """Attributes to set on the server span of a profile ``submit`` accepted."""
        ...

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued profile was sent or counted as failed."""
        ...

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (within ``timeout``), then stop."""
        ...

    def note_unsent(self, waited: float) -> int:
        """At shutdown, after a flush that did not end within ``waited`` seconds: count
        and log the profiles not sent yet (they stay queued); returns their number."""
        ...


class _Exporters:
    """Several exporters behind one: each gets every profile (Pyroscope and OTLP both on)."""

    def __init__(self, exporters: list[ProfileExporter]) -> None:
        self.exporters = exporters
        # The exporters that took the last profile submitted on this thread: the core
        # asks for span_attributes right after submit, on the same thread.
        self._accepted = threading.local()

    def submit(self, summary: ProfileSummary, session: Session, span: SpanFacts) -> bool:
        accepted = [e for e in self.exporters if e.submit(summary, session, span)]
        self._accepted.last = (summary, accepted)
        return bool(accepted)

    def span_attributes(self, summary: ProfileSummary) -> Mapping[str, str]:
        last: tuple[ProfileSummary, list[ProfileExporter]] | None
        last = getattr(self._accepted, "last", None)
        attributes: dict[str, str] = {}
        if last is not None and last[0] is summary:
            for exporter in last[1]:
                attributes.update(exporter.span_attributes(summary))
        return attributes

    def flush(self, timeout: float = 5.0) -> bool:
        return all([exporter.flush(timeout) for exporter in self.exporters])

    def close(self, timeout: float = 5.0) -> None:
        for exporter in self.exporters:
            exporter.close(timeout)

    def note_unsent(self, waited: float) -> int:
        return sum(exporter.note_unsent(waited) for exporter in self.exporters)


def check_exporter_settings(otlp_profiles: bool, environ: Mapping[str, str] | None = None) -> None:
    """Check, without sending anything, that the exporters the settings ask for can run.

    Raises:
        ValueError: an ``OTEL_EXPORTER_OTLP_*`` variable does not parse (named).
        ImportError: the OTLP export is on and its extra is not installed.
    """
    if not otlp_profiles:
        return
    from .otlp import require_proto, settings_from_env

    require_proto()
    settings_from_env(os.environ if environ is None else environ)


def open_exporter(
    pyroscope_url: str | None,
    *,
    tenant_id: str | None = None,
    service_name: str | None = None,
    otlp_profiles: bool = False,
    otlp_profiles_pyroscope: bool = False,
    environ: Mapping[str, str] | None = None,
) -> ProfileExporter | None:
    """The exporter the settings ask for, or None when every export is off.

    Args:
        pyroscope_url: base URL of a Pyroscope server (``OTELPROF_PYROSCOPE_URL``);
            None turns the Pyroscope export off (the default).
        tenant_id: sent as ``X-Scope-OrgID`` (``OTELPROF_PYROSCOPE_TENANT_ID``).
        service_name: the ``service_name`` label when the span's resource has none.
        otlp_profiles: also send OTLP profiles (``OTELPROF_OTLP_PROFILES``), configured
            by the ``OTEL_EXPORTER_OTLP_*`` variables of ``environ``.
        otlp_profiles_pyroscope: the OTLP profiles reach Grafana Pyroscope: set
            ``pyroscope.profile.id`` on their spans (``OTELPROF_OTLP_PROFILES_PYROSCOPE``).
        environ: the environment to read (default ``os.environ``).

    Raises:
        ValueError: ``pyroscope_url`` is not an absolute http(s) URL, or an
            ``OTEL_EXPORTER_OTLP_*`` variable does not parse.
        ImportError: the OTLP export is on and opentelemetry-proto is missing.
    """
    exporters: list[ProfileExporter] = []
    if pyroscope_url:
        from .pyroscope import PyroscopeExporter  # httpx and the encoder only when used

        exporters.append(
            PyroscopeExporter(pyroscope_url, tenant_id=tenant_id, service_name=service_name)
        )
    if otlp_profiles:
        from .otlp import OtlpProfilesExporter, settings_from_env

        settings = settings_from_env(os.environ if environ is None else environ)
        exporters.append(
            OtlpProfilesExporter(settings, pyroscope_span_attribute=otlp_profiles_pyroscope)
        )
    if not exporters:
        return None
    if len(exporters) == 1:
        return exporters[0]
    return _Exporters(exporters)
