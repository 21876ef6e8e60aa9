"""Log correlation: trace id, span id and profile URL on every log record of a request.

Two entry points, for the two logging stacks people use:

* :class:`ProfileLogFilter`, a stdlib :class:`logging.Filter` that sets the record
  attributes ``trace_id``, ``span_id`` and ``profile_url``;
* :func:`add_profile_context`, a structlog processor that adds the same keys to the
  event dict (structlog itself is not imported: the processor is a plain function).

``trace_id`` and ``span_id`` are those of the *current* OpenTelemetry span (32 and 16
lowercase hex digits), as OTel's own logging instrumentation reports them.
``profile_url`` is the link of the current request's profile. It is known as soon as
the request is profiled, but whether the profile is **kept** is decided when the request
ends (``min_duration_ms``; a full writer queue): records emitted during the request carry
the URL the profile will have if it is kept, and records emitted after the decision carry
none when it was discarded. See docs/logging.md.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import format_span_id, format_trace_id

from .profiling._request_profile import current_request

__all__ = ["ProfileLogFilter", "add_profile_context", "current_profile_url"]


def current_profile_url() -> str | None:
    """The profile URL of the request being handled in this context, if it is profiled.

    Returns:
        The absolute link (never carrying the debug token), or None outside a request,
        for an unprofiled request, or after the profile was discarded.
    """
    request = current_request.get()
    return None if request is None else request.url


def _current_ids() -> tuple[str, str] | None:
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format_trace_id(context.trace_id), format_span_id(context.span_id)


class ProfileLogFilter(logging.Filter):
    """Adds ``trace_id``, ``span_id`` and ``profile_url`` to every record; drops none.

    Attach it to a **handler** (a logger's own filters do not see records propagated
    from child loggers). Attributes a record already has (from ``extra=`` or OTel's
    logging instrumentation) are left as they are.

    Example::

        import logging
        from otelprof_middleware.logging import ProfileLogFilter

        handler = logging.StreamHandler()
        handler.addFilter(ProfileLogFilter())
        handler.setFormatter(logging.Formatter(
            "%(levelname)s %(message)s trace_id=%(trace_id)s span_id=%(span_id)s "
            "profile=%(profile_url)s"
        ))
        logging.getLogger().addHandler(handler)

    Args:
        name: as for :class:`logging.Filter` (only records of that logger subtree pass
            through this filter's enrichment; default: all).
        default: the value set when there is no span or no profile (default ``""``), so
            format strings never fail.
    """

    def __init__(self, name: str = "", *, default: str = "") -> None:
        super().__init__(name)
        self.default = default

    def filter(self, record: logging.LogRecord) -> bool:
        """Enrich ``record``; always True (the filter never drops a record)."""
        if not super().filter(record):
            return True
        try:
            ids = _current_ids()
            url = current_profile_url()
        except Exception:  # never let correlation break logging
            ids, url = None, None
        trace_id, span_id = ids or (self.default, self.default)
        _set_missing(record, "trace_id", trace_id)
        _set_missing(record, "span_id", span_id)
        _set_missing(record, "profile_url", url or self.default)
        return True


def _set_missing(record: logging.LogRecord, name: str, value: str) -> None:
    if getattr(record, name, None) in (None, ""):
        setattr(record, name, value)


def add_profile_context(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: add ``trace_id``, ``span_id`` and ``profile_url`` when known.

    Keys are added only when there is a valid current span (ids) or a profile (URL), and
    never replace keys the event already has.

    Example::

        import structlog
        from otelprof_middleware.logging import add_profile_context

        structlog.configure(processors=[
            add_profile_context,
            structlog.processors.JSONRenderer(),
        ])

    Args:
        logger: the wrapped logger (unused).
        method_name: the log method's name (unused).
        event_dict: the event being built.

    Returns:
        ``event_dict``, enriched.
    """
    try:
        ids = _current_ids()
        url = current_profile_url()
    except Exception:  # never let correlation break logging
        return event_dict
    if ids is not None:
        event_dict.setdefault("trace_id", ids[0])
        event_dict.setdefault("span_id", ids[1])
    if url is not None:
        event_dict.setdefault("profile_url", url)
    return event_dict
