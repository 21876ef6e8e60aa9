"""Send kept profiles over OTLP's profiles signal (``profiles.v1development``), http/protobuf.

What is sent (sources and the reasoning in ``docs/otlp-profiles.md``):

* ``POST <endpoint>`` with ``Content-Type: application/x-protobuf`` and an
  ``ExportProfilesServiceRequest`` as the body (gzipped with ``Content-Encoding: gzip``
  when compression is ``gzip``). The endpoint is ``OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT``
  as given, else ``OTEL_EXPORTER_OTLP_ENDPOINT`` + ``/v1development/profiles`` (the path
  the Collector's OTLP receiver and Pyroscope serve), else
  ``http://localhost:4318/v1development/profiles``.
* One ``ResourceProfiles`` per resource, one ``Profile`` per kept request, each sample
  linked to the request's span; how the request is built is in :mod:`._otlp_encode`
  (:func:`encode_request`).

Delivery is the shared :class:`~._http.HttpExporter`: a bounded queue, one thread per
process, batches, retries of connection errors and 429/502/503/504 with backoff and
``Retry-After``; other statuses are not retried. A partial success is logged and its
rejected profiles counted. ``opentelemetry-proto`` (the ``otlp`` extra) is imported
only when this exporter is used.

This module holds the exporter and its settings (read from the ``OTEL_EXPORTER_OTLP_*``
variables); :func:`encode_request` and :func:`require_proto` are re-exported from
:mod:`._otlp_encode`.
"""

from __future__ import annotations

import gzip
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import unquote

import httpx

from .._failsafe import count, log_event
from .._net import http_url_parts
from .._record import ProfileSummary
from ..profiling._span import PYROSCOPE_PROFILE_ID
from ._http import ExportError, HttpExporter, QueuedProfile, RetryPolicy
from ._otlp_encode import encode_request, require_proto

__all__ = [
    "CONTENT_TYPE",
    "SIGNAL_PATH",
    "OtlpProfilesExporter",
    "OtlpProfilesSettings",
    "encode_request",
    "parse_headers",
    "require_proto",
    "settings_from_env",
]

SIGNAL_PATH = "/v1development/profiles"
"""The OTLP/HTTP path of the profiles signal (opentelemetry-proto's specification.md;
``defaultProfilesURLPath`` of the Collector's OTLP receiver; Pyroscope's route)."""

CONTENT_TYPE = "application/x-protobuf"
DEFAULT_ENDPOINT = "http://localhost:4318"
DEFAULT_TIMEOUT_MS = 10_000
MAX_RESPONSE_BYTES = 4 * 1024 * 1024  # the specification's recommended client limit

_RETRY = RetryPolicy(max_attempts=5, initial_backoff=1.0, max_backoff=16.0, budget=30.0)
_HEADER_KEY = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
_logger = logging.getLogger("otelprof_middleware")
_warned: set[tuple[str, str]] = set()  # timeout values already warned about


# --- settings -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OtlpProfilesSettings:
    """Where and how to send, read from the standard ``OTEL_EXPORTER_OTLP_*`` variables.

    Attributes:
        endpoint: the full URL profiles are posted to.
        headers: extra request headers (authentication, tenant).
        timeout: seconds per HTTP request.
        compression: ``"gzip"`` or ``"none"``.
    """

    endpoint: str = DEFAULT_ENDPOINT + SIGNAL_PATH
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout: float = DEFAULT_TIMEOUT_MS / 1000.0
    compression: str = "none"


def _env(environ: Mapping[str, str], signal: str, general: str) -> tuple[str, str] | None:
    """The value of the profiles variable, else of the general one: (name, value)."""
    for name in (signal, general):
        value = environ.get(name, "").strip()
        if value:
            return name, value
    return None


def _check_url(name: str, value: str) -> str:
    if http_url_parts(value) is None:
        # Never echo the value: it may carry credentials.
        raise ValueError(f"{name} must be an absolute http(s) URL")
    return value


def parse_headers(name: str, text: str) -> dict[str, str]:
    """Parse ``key1=value1,key2=value2`` (the OTLP exporter's headers variable format).

    Keys and values are percent-decoded and stripped, keys lowercased. Values are never
    put in error messages: they usually hold tokens.

    Raises:
        ValueError: an entry without ``=`` or with an invalid header name; names ``name``.
    """
    headers: dict[str, str] = {}
    for position, entry in enumerate(text.split(","), start=1):
        if not entry.strip():
            continue
        key, sep, value = entry.partition("=")
        key = unquote(key).strip()
        if not sep or not _HEADER_KEY.fullmatch(key):
            raise ValueError(
                f"{name}: entry {position} must be key=value with an HTTP header name as key"
            )
        value = unquote(value).strip()
        if "\r" in value or "\n" in value:
            raise ValueError(f"{name}: entry {position} has a line break in its value")
        headers[key.lower()] = value
    return headers


def settings_from_env(environ: Mapping[str, str]) -> OtlpProfilesSettings:
    """Read the OTLP exporter variables, profiles-specific first, as the OTel spec says.

    Raises:
        ValueError: a value that does not parse, or a protocol other than
            ``http/protobuf``; the message names the variable.
    """
    protocol = _env(environ, "OTEL_EXPORTER_OTLP_PROFILES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
    if protocol is not None and protocol[1] != "http/protobuf":
        raise ValueError(
            f"{protocol[0]} is {protocol[1]!r}; otelprof sends OTLP profiles over "
            "http/protobuf only: set OTEL_EXPORTER_OTLP_PROFILES_PROTOCOL=http/protobuf "
            "and OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT to the receiver's OTLP/HTTP URL "
            f"(port 4318, path {SIGNAL_PATH})"
        )
    endpoint = DEFAULT_ENDPOINT + SIGNAL_PATH
    own = environ.get("OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT", "").strip()
    base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if own:
        endpoint = _check_url("OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT", own)  # used as is
    elif base:
        _check_url("OTEL_EXPORTER_OTLP_ENDPOINT", base)
        endpoint = base.rstrip("/") + SIGNAL_PATH
    headers: dict[str, str] = {}
    found = _env(environ, "OTEL_EXPORTER_OTLP_PROFILES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS")
    if found is not None:
        headers = parse_headers(*found)
    timeout_ms = float(DEFAULT_TIMEOUT_MS)
    found = _env(environ, "OTEL_EXPORTER_OTLP_PROFILES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT")
    if found is not None:
        try:
            timeout_ms = float(found[1])
        except ValueError:
            timeout_ms = math.nan
        if not math.isfinite(timeout_ms) or timeout_ms <= 0:
            raise ValueError(
                f"{found[0]} must be a positive number of milliseconds, got {found[1]!r}"
            )
        if timeout_ms < 100 and found not in _warned:
            _warned.add(found)
            _logger.warning(
                "otelprof: %s=%s is read as milliseconds, as the OTLP specification says "
                "(the Python SDK's own exporters read seconds); OTLP profiles will time "
                "out after %g ms",
                found[0],
                found[1],
                timeout_ms,
            )
    compression = "none"
    found = _env(
        environ, "OTEL_EXPORTER_OTLP_PROFILES_COMPRESSION", "OTEL_EXPORTER_OTLP_COMPRESSION"
    )
    if found is not None:
        compression = found[1].lower()
        if compression not in ("gzip", "none"):
            raise ValueError(f"{found[0]} must be gzip or none, got {found[1]!r}")
    return OtlpProfilesSettings(
        endpoint=endpoint, headers=headers, timeout=timeout_ms / 1000.0, compression=compression
    )


# --- the exporter ---------------------------------------------------------------------


class OtlpProfilesExporter(HttpExporter):
    """Sends each kept profile as an OTLP profile, every sample linked to its span.

    Off by default; turned on by ``OTELPROF_OTLP_PROFILES=true`` (``otlp_profiles=True``),
    configured by the standard ``OTEL_EXPORTER_OTLP_PROFILES_*`` / ``OTEL_EXPORTER_OTLP_*``
    variables (:func:`settings_from_env`).

    Example::

        exporter = OtlpProfilesExporter(
            OtlpProfilesSettings(endpoint="http://collector:4318/v1development/profiles")
        )
        exporter.submit(summary, session, SpanFacts.of(span))

    Args:
        settings: endpoint, headers, timeout and compression.
        pyroscope_span_attribute: set ``pyroscope.profile.id`` on the span of every
            accepted profile: say so only when the profiles end up in Grafana Pyroscope,
            which labels each sample with its link's span id
            (``OTELPROF_OTLP_PROFILES_PYROSCOPE``).
        queue_size: profiles that may wait (default 256); more are dropped and counted,
            as are profiles beyond ``QUEUED_SAMPLES`` samples in all (see the base).
        batch_size: at most this many profiles per request (default 32).
        retry: the retry policy (default: 5 attempts within 30 s, backoff from 1 s).
        transport: an httpx transport (tests).

    Raises:
        ImportError: opentelemetry-proto is missing or too old.
    """

    def __init__(
        self,
        settings: OtlpProfilesSettings,
        *,
        pyroscope_span_attribute: bool = False,
        queue_size: int = 256,
        batch_size: int = 32,
        retry: RetryPolicy = _RETRY,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        require_proto()  # fail at start-up, not on the first kept profile
        from .. import __version__

        self.endpoint = settings.endpoint
        self._gzip = settings.compression == "gzip"
        # The variables' header names are lowercase: a user-agent of theirs replaces
        # ours, and the body's content type and encoding are always ours (without this,
        # two headers of one name went out, and receivers read the first).
        extra = dict(settings.headers)
        self._headers = {
            "User-Agent": extra.pop("user-agent", f"otelprof-middleware/{__version__}"),
            **{n: v for n, v in extra.items() if n not in ("content-type", "content-encoding")},
            "Content-Type": CONTENT_TYPE,
        }
        if self._gzip:
            self._headers["Content-Encoding"] = "gzip"
        self._pyroscope_attribute = pyroscope_span_attribute
        super().__init__(
            thread_name="otelprof-otlp-profiles",
            prefix="otlp_profiles",
            queue_size=queue_size,
            batch_size=batch_size,
            timeout=settings.timeout,
            transport=transport,
            retry=retry,
        )

    def span_attributes(self, summary: ProfileSummary) -> Mapping[str, str]:
        """``pyroscope.profile.id`` when the profiles go to Pyroscope, else nothing."""
        if self._pyroscope_attribute:
            return {PYROSCOPE_PROFILE_ID: summary.span_id}
        return {}

    def _send(self, client: httpx.Client, items: Sequence[QueuedProfile]) -> None:
        body = encode_request(items).SerializeToString()
        if self._gzip:
            body = gzip.compress(body, compresslevel=6)
        response = self._post(client, self.endpoint, content=body, headers=self._headers)
        rejected, message = _partial_success(response)
        rejected = min(rejected, len(items))
        if rejected:
            count("otlp_profiles.rejected", rejected)
        if message or rejected:
            log_event(
                "otlp_profiles.partial_success",
                "otelprof: the OTLP receiver %s of %d profiles: %s. Further partial "
                "successes are counted (otlp_profiles.rejected) and logged at most once "
                "a minute.",
                f"rejected {rejected}" if rejected else "accepted all",
                len(items),
                message or "(no message)",
            )
        count("otlp_profiles.exported", len(items) - rejected)


def _partial_success(response: httpx.Response) -> tuple[int, str]:
    """(rejected profiles, error message) of an ``ExportProfilesServiceResponse``."""
    body = response.content
    if len(body) > MAX_RESPONSE_BYTES:
        # The specification: a client treats an over-long response as a failure, not retried.
        raise ExportError(f"response of {len(body)} bytes, more than {MAX_RESPONSE_BYTES}")
    if not body:
        return 0, ""
    if not response.headers.get("content-type", "").startswith(CONTENT_TYPE):
        return 0, ""  # some proxies answer 200 with text: nothing to read
    service = require_proto()[0]
    message = service.ExportProfilesServiceResponse()
    try:
        message.ParseFromString(body)
    except Exception:
        return 0, ""
    if not message.HasField("partial_success"):
        return 0, ""
    partial = message.partial_success
    return max(0, int(partial.rejected_profiles)), str(partial.error_message)[:500]
