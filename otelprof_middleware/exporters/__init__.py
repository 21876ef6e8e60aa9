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

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from opentelemetry import trace
from pyinstrument.session import Session

from .._record import ProfileSummary

__all__ = ["ProfileExporter", "SpanFacts", "open_exporter"]


@dataclass(frozen=True, slots=True)
class SpanFacts:
    """What an exporter may want from the server span, read on the request's thread.

    Attributes:
        name: the span's name (e.g. ``GET /items/{item_id}``), ``""`` when unreadable.
        service_name: the ``service.name`` of the span's resource, if any.
    """

    name: str = ""
    service_name: str | None = None

    @classmethod
    def of(cls, span: trace.Span) -> SpanFacts:
        """Read the facts of an SDK span; API-only spans give empty facts."""
        name = getattr(span, "name", "")
        resource = getattr(span, "resource", None)
        attributes = getattr(resource, "attributes", None)
        service = attributes.get("service.name") if isinstance(attributes, Mapping) else None
        return cls(
            name=name if isinstance(name, str) else "",
            service_name=service if isinstance(service, str) and service else None,
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


def open_exporter(
    pyroscope_url: str | None,
    *,
    tenant_id: str | None = None,
    service_name: str | None = None,
) -> ProfileExporter | None:
    """The exporter the settings ask for, or None when every export is off.

    Args:
        pyroscope_url: base URL of a Pyroscope server (``OTELPROF_PYROSCOPE_URL``);
            None turns the Pyroscope export off (the default).
        tenant_id: sent as ``X-Scope-OrgID`` (``OTELPROF_PYROSCOPE_TENANT_ID``).
        service_name: the ``service_name`` label when the span's resource has none.

    Raises:
        ValueError: ``pyroscope_url`` is not an absolute http(s) URL.
    """
    if not pyroscope_url:
        return None
    from .pyroscope import PyroscopeExporter  # httpx and the encoder only when used

    return PyroscopeExporter(pyroscope_url, tenant_id=tenant_id, service_name=service_name)
