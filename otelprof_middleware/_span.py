"""Everything about the OTel span: which one we join, and the attribute names we set.

Attribute names live here and nowhere else; docs/attributes.md explains the choice.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace

from ._config import DEBUG_PREFIX

__all__ = [
    "BASELINE_URL",
    "PROFILE_ID",
    "PROFILE_URL",
    "PYROSCOPE_PROFILE_ID",
    "ROUTE_KEY",
    "current_server_span",
    "diff_url",
    "profile_url",
    "redact_viewer_token",
    "route_attribute",
    "set_profile_attributes",
]

PROFILE_ID = "otelprof.profile.id"
"""``<trace_id>-<span_id>``: the stored profile's key."""

PROFILE_URL = "otelprof.profile.url"
"""Absolute URL of the profile page; Grafana shows it in the span's attributes."""

PYROSCOPE_PROFILE_ID = "pyroscope.profile.id"
"""The span id, set only while the Pyroscope export is on: Grafana's "traces to
profiles" reads it and asks Pyroscope for the samples labelled ``span_id=<it>``."""

ROUTE_KEY = "otelprof.route"
"""ASGI scope / WSGI environ key where a framework integration leaves the route template
(``otelprof_middleware.django.RouteMiddleware``); the adapters read it."""

BASELINE_URL = "otelprof.profile.baseline_url"
"""Absolute URL of this request compared with the recent requests of its route."""


def current_server_span() -> trace.Span | None:
    """The span to join: the current span when it was started in this process.

    Every instrumentation that runs before us (FastAPI's own telemetry,
    FastAPIInstrumentor, OpenTelemetryMiddleware outside ours) makes its server span
    current, so at our entry it is ``get_current_span()``. A remote parent (a
    ``NonRecordingSpan`` built from headers) or no span means nobody opened the server
    span yet; the adapters then open one through the OTel middleware. FlaskInstrumentor
    starts its span later, in ``before_request``: it then finds ours current and makes
    its own an INTERNAL child, so there is still exactly one server span.
    """
    span = trace.get_current_span()
    context = span.get_span_context()
    if not context.is_valid or context.is_remote:
        return None
    return span


def profile_url(base_url: str, trace_id: str, span_id: str) -> str:
    """The absolute link to one profile. Never carries the debug token."""
    return f"{base_url}{DEBUG_PREFIX}/{trace_id}?span_id={span_id}"


def diff_url(base_url: str, trace_id: str, span_id: str) -> str:
    """The absolute link to a request compared with its route's baseline."""
    return f"{base_url}{DEBUG_PREFIX}/{trace_id}/diff?span_id={span_id}"


def set_profile_attributes(
    span: trace.Span, trace_id: str, span_id: str, base_url: str, *, has_route: bool
) -> None:
    """Put the profile id and links on ``span`` (call before the span ends)."""
    attributes = {
        PROFILE_ID: f"{trace_id}-{span_id}",
        PROFILE_URL: profile_url(base_url, trace_id, span_id),
    }
    if has_route:  # an unmatched request has no route, so no baseline
        attributes[BASELINE_URL] = diff_url(base_url, trace_id, span_id)
    span.set_attributes(attributes)


_TOKEN_IN_QUERY = re.compile(r"(^|[?&])token=[^&#]*")
_URL_ATTRIBUTES = ("url.query", "url.full", "http.url", "http.target")


def redact_viewer_token(span: trace.Span) -> None:
    """Blank ``token=`` in the URL attributes an outer instrumentation put on ``span``.

    A browser opens the viewer once with ``?token=...``; an OTel server span opened
    around the middleware has already recorded that URL, and would export the token with
    the trace.
    """
    if not span.is_recording():
        return
    attributes: Mapping[str, Any] | None = getattr(span, "attributes", None)
    for key in _URL_ATTRIBUTES:
        value = attributes.get(key) if attributes else None
        if isinstance(value, str) and "token=" in value:
            span.set_attribute(key, _TOKEN_IN_QUERY.sub(r"\1token=REDACTED", value))


def route_attribute(span: trace.Span) -> str | None:
    """The ``http.route`` an instrumentation already put on ``span``, if readable."""
    attributes: Mapping[str, Any] | None = getattr(span, "attributes", None)
    if not attributes:
        return None
    route = attributes.get("http.route")
    return route if isinstance(route, str) else None
