"""Send kept profiles over OTLP's profiles signal (``profiles.v1development``), http/protobuf.

What is sent (sources and the reasoning in ``docs/otlp-profiles.md``):

* ``POST <endpoint>`` with ``Content-Type: application/x-protobuf`` and an
  ``ExportProfilesServiceRequest`` as the body (gzipped with ``Content-Encoding: gzip``
  when compression is ``gzip``). The endpoint is ``OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT``
  as given, else ``OTEL_EXPORTER_OTLP_ENDPOINT`` + ``/v1development/profiles`` (the path
  the Collector's OTLP receiver and Pyroscope serve), else
  ``http://localhost:4318/v1development/profiles``.
* One ``ResourceProfiles`` per distinct resource (the span's, i.e. the app's
  ``TracerProvider``'s: ``service.name`` and the rest), one ``ScopeProfiles``
  (``otelprof_middleware``), one ``Profile`` per kept request: sample type and period type
  ``wall``/``nanoseconds``, period the sampling interval, ``time_unix_nano`` and
  ``duration_nano`` of the request, the request's method, route and status as profile
  attributes. Each distinct stack is one ``Sample`` whose single value is the wall time
  sampled in it, in nanoseconds, and whose ``link_index`` points at the request's
  ``Link{trace_id, span_id}``.
* One ``ProfilesDictionary`` for the whole request; every table starts with its zero
  entry (``""``, ``Mapping{}``, ``Location{}``, ``Function{}``, ``Link{}``,
  ``KeyValueAndUnit{}``, ``Stack{}``), so index 0 means "not set" as the proto requires.

Delivery is the shared :class:`~._http.HttpExporter`: a bounded queue, one thread per
process, batches, retries of connection errors and 429/502/503/504 with backoff and
``Retry-After``; other statuses are not retried. A partial success is logged and its
rejected profiles counted. ``opentelemetry-proto`` (the ``otlp`` extra) is imported
only when this exporter is used.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import httpx

from .._failsafe import count, log_event
from .._record import ProfileSummary
from ..profiling._span import PYROSCOPE_PROFILE_ID
from ._http import ExportError, HttpExporter, QueuedProfile, RetryPolicy
from ._stacks import frame_parts

if TYPE_CHECKING:
    from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
        ExportProfilesServiceRequest,
    )

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
SAMPLE_TYPE = ("wall", "nanoseconds")
"""Type and unit of every sample value (and of the period). Pyroscope names the profile
by the period type: ``wall:nanoseconds:wall:nanoseconds``, profile name ``wall``."""
SCOPE_NAME = "otelprof_middleware"
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
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
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


def require_proto() -> tuple[ModuleType, ModuleType, ModuleType, ModuleType]:
    """Import opentelemetry-proto's generated classes this exporter needs.

    Returns:
        The modules ``profiles_service_pb2``, ``profiles_pb2``, ``common_pb2`` and
        ``resource_pb2``.

    Raises:
        ImportError: the ``otlp`` extra is not installed, or its version encodes profiles
            with a different field layout than the Collector and Pyroscope read.
    """
    try:
        from opentelemetry.proto.collector.profiles.v1development import (
            profiles_service_pb2,
        )
        from opentelemetry.proto.common.v1 import common_pb2
        from opentelemetry.proto.profiles.v1development import profiles_pb2
        from opentelemetry.proto.resource.v1 import resource_pb2
    except ImportError as exc:
        raise ImportError(
            "otlp_profiles (OTELPROF_OTLP_PROFILES) needs opentelemetry-proto >= 1.43: "
            "pip install 'otelprof-middleware[otlp]'"
            f" ({exc})"
        ) from exc
    # opentelemetry-proto 1.40-1.42 (proto v1.9) numbered Sample's fields differently:
    # the Collector (>= 0.148) and Pyroscope (>= 1.20) would misread those profiles.
    values = profiles_pb2.Sample.DESCRIPTOR.fields_by_name.get("values")
    if values is None or values.number != 4 or not hasattr(profiles_pb2, "Stack"):
        raise ImportError(
            "otlp_profiles (OTELPROF_OTLP_PROFILES) needs opentelemetry-proto >= 1.43 "
            "(OTLP proto v1.10 profiles); pip install -U 'otelprof-middleware[otlp]'"
        )
    return profiles_service_pb2, profiles_pb2, common_pb2, resource_pb2


# --- encoding -------------------------------------------------------------------------


def _any_value(common: ModuleType, value: object) -> Any:
    """An ``AnyValue`` for an OTel attribute value (str, bool, int, float or a sequence)."""
    if isinstance(value, bool):
        return common.AnyValue(bool_value=value)
    if isinstance(value, int):
        return common.AnyValue(int_value=value)
    if isinstance(value, float):
        return common.AnyValue(double_value=value)
    if isinstance(value, str):
        return common.AnyValue(string_value=value)
    if isinstance(value, (list, tuple)):
        items = [_any_value(common, item) for item in value]
        return common.AnyValue(array_value=common.ArrayValue(values=items))
    return common.AnyValue(string_value=str(value))


def profile_id(trace_id: str, span_id: str) -> bytes:
    """The profile's 16-byte id, derived from its span: a retried send keeps its id."""
    return hashlib.blake2b(f"{trace_id}-{span_id}".encode(), digest_size=16).digest()


class _Dictionary:
    """The request's ``ProfilesDictionary``, interning every entry (zero entries first)."""

    def __init__(self, pb: ModuleType, common: ModuleType) -> None:
        self.pb = pb
        self.common = common
        self.message = pb.ProfilesDictionary()
        self.strings: dict[str, int] = {}
        self.functions: dict[tuple[str, str, int], int] = {}
        self.locations: dict[tuple[int, int], int] = {}
        self.stacks: dict[tuple[int, ...], int] = {}
        self.links: dict[tuple[str, str], int] = {}
        self.attributes: dict[tuple[str, object], int] = {}
        self.string("")
        self.message.mapping_table.add()
        self.message.location_table.add()
        self.message.function_table.add()
        self.message.link_table.add()
        self.message.attribute_table.add()
        self.message.stack_table.add()

    def string(self, text: str) -> int:
        index = self.strings.get(text)
        if index is None:
            index = self.strings[text] = len(self.message.string_table)
            self.message.string_table.append(text)
        return index

    def location(self, frame_info: str) -> int:
        frame = frame_parts(frame_info)
        key = (frame.name, frame.path, frame.first_line)
        function = self.functions.get(key)
        if function is None:
            function = self.functions[key] = len(self.message.function_table)
            self.message.function_table.add(
                name_strindex=self.string(frame.name),
                system_name_strindex=self.string(frame.bare_name or frame.name),
                filename_strindex=self.string(frame.path),
                start_line=frame.first_line,
            )
        location_key = (function, frame.line)
        location = self.locations.get(location_key)
        if location is None:
            location = self.locations[location_key] = len(self.message.location_table)
            self.message.location_table.add(
                lines=[self.pb.Line(function_index=function, line=frame.line)]
            )
        return location

    def stack(self, locations: tuple[int, ...]) -> int:
        index = self.stacks.get(locations)
        if index is None:
            index = self.stacks[locations] = len(self.message.stack_table)
            self.message.stack_table.add(location_indices=locations)
        return index

    def link(self, trace_id: str, span_id: str) -> int:
        index = self.links.get((trace_id, span_id))
        if index is None:
            index = self.links[(trace_id, span_id)] = len(self.message.link_table)
            self.message.link_table.add(
                trace_id=bytes.fromhex(trace_id), span_id=bytes.fromhex(span_id)
            )
        return index

    def attribute(self, key: str, value: str | int) -> int:
        index = self.attributes.get((key, value))
        if index is None:
            index = self.attributes[(key, value)] = len(self.message.attribute_table)
            self.message.attribute_table.add(
                key_strindex=self.string(key), value=_any_value(self.common, value)
            )
        return index


def _profile(dictionary: _Dictionary, item: QueuedProfile) -> Any:
    pb = dictionary.pb
    summary, session = item.summary, item.session
    value_type = pb.ValueType(
        type_strindex=dictionary.string(SAMPLE_TYPE[0]),
        unit_strindex=dictionary.string(SAMPLE_TYPE[1]),
    )
    # Epoch seconds as floats hold microseconds, not nanoseconds: round to those.
    start_ns = round(summary.start_time * 1e6) * 1000
    attributes = [
        dictionary.attribute("http.request.method", summary.method),
        dictionary.attribute("http.response.status_code", summary.status_code),
    ]
    if summary.route:
        attributes.append(dictionary.attribute("http.route", summary.route))
    profile = pb.Profile(
        sample_type=value_type,
        period_type=value_type,
        period=max(1, round(session.min_interval * 1e9)),
        time_unix_nano=start_ns,
        duration_nano=max(0, round(session.duration * 1e9)),
        profile_id=profile_id(summary.trace_id, summary.span_id),
        attribute_indices=attributes,
    )
    link = dictionary.link(summary.trace_id, summary.span_id)
    values: dict[int, int] = {}  # stack index -> nanoseconds: one sample per stack
    frames: dict[str, int] = {}
    for stack, seconds in session.frame_records:
        nanoseconds = round(seconds * 1e9)
        if nanoseconds <= 0 or not stack:
            continue
        locations: list[int] = []
        for frame_info in reversed(stack):  # the leaf first, as Stack.location_indices says
            location = frames.get(frame_info)
            if location is None:
                location = frames[frame_info] = dictionary.location(frame_info)
            locations.append(location)
        index = dictionary.stack(tuple(locations))
        values[index] = values.get(index, 0) + nanoseconds
    for index, nanoseconds in values.items():
        profile.samples.add(stack_index=index, link_index=link, values=[nanoseconds])
    return profile


def encode_request(items: Sequence[QueuedProfile]) -> ExportProfilesServiceRequest:
    """One ``ExportProfilesServiceRequest`` holding a profile per item.

    Items with the same resource share one ``ResourceProfiles``.

    Raises:
        ImportError: opentelemetry-proto is missing (see :func:`require_proto`).
    """
    service, pb, common, resource_pb = require_proto()
    from .. import __version__

    dictionary = _Dictionary(pb, common)
    groups: dict[tuple[tuple[str, str], ...], tuple[Mapping[str, object], list[Any]]] = {}
    for item in items:
        attributes = item.span.resource
        key = tuple(sorted((k, repr(v)) for k, v in attributes.items()))
        group = groups.setdefault(key, (attributes, []))
        group[1].append(_profile(dictionary, item))
    request = service.ExportProfilesServiceRequest(dictionary=dictionary.message)
    scope = common.InstrumentationScope(name=SCOPE_NAME, version=__version__)
    for attributes, profiles in groups.values():
        resource = resource_pb.Resource(
            attributes=[
                common.KeyValue(key=key, value=_any_value(common, value))
                for key, value in attributes.items()
            ]
        )
        request.resource_profiles.add(
            resource=resource,
            scope_profiles=[pb.ScopeProfiles(scope=scope, profiles=profiles)],
        )
    return request  # type: ignore[no-any-return]


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
        queue_size: profiles that may wait (default 256); more are dropped and counted.
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
        self._headers = {
            "User-Agent": f"otelprof-middleware/{__version__}",
            **settings.headers,
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
