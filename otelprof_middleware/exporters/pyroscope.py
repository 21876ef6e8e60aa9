"""Push kept profiles to Grafana Pyroscope, labelled so Grafana finds them by span.

What is sent (sources in ``docs/pyroscope.md``):

* ``POST <url>/ingest?name=<app>{service_name=<svc>}&from=<s>&until=<s>&format=pprof
  &spyName=otelprof`` with a gzipped pprof ``Profile`` as the body. Pyroscope's ingest
  handler takes the series labels from ``name`` and, for ``format=pprof``, the sample
  types and units from the profile itself (``units``, ``sampleRate`` and
  ``aggregationType`` are ignored for pprof, so they are not sent).
* One sample type, ``wall``/``nanoseconds`` (period type the same, period the sampling
  interval): pyinstrument measures wall-clock time and its samples carry unequal
  durations, so each stack's value is its measured time in nanoseconds, not a count.
  Pyroscope lists it as the profile type ``wall:wall:nanoseconds:wall:nanoseconds``.
* Per-sample pprof labels: ``span_id`` (16 hex digits; Pyroscope keeps it per sample
  for span profiles, which is what Grafana's ``spanSelector`` queries), ``span_name``
  and ``http_route`` (Pyroscope turns other sample labels into series labels; both have
  low cardinality). Folded text cannot carry per-sample labels: a ``span_id`` in the
  ``name`` would become a series label, one series per request, that Grafana's span
  query does not read. That is why this exporter speaks pprof.

Delivery runs on one daemon thread per process with a bounded queue; a full queue
drops the profile (counter ``pyroscope.dropped.queue_full``) and the request never
waits. Profiles waiting together are sent as one request (one pprof with several
spans). Every failure is counted (``pyroscope.failed`` per profile, and
``failed.pyroscope.push`` per request, logged at most once a minute) and nothing is
retried: the profile is still in otelprof's own store.
"""

from __future__ import annotations

import functools
import gzip
import math
from collections.abc import Iterable, Mapping, Sequence
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx
from pyinstrument.session import Session

from .._failsafe import count, fail_open
from .._identifiers import frame_parts
from .._record import ProfileSummary
from ..profiling._span import PYROSCOPE_PROFILE_ID
from ._http import ExportError, HttpExporter, QueuedProfile
from ._stacks import SAMPLE_TYPE, stack_samples

__all__ = [
    "PyroscopeError",
    "PyroscopeExporter",
    "QueuedProfile",
    "encode_pprof",
    "ingest_name",
]

PyroscopeError = ExportError
"""Pyroscope answered with an error status (the shared :class:`ExportError`)."""

SPY_NAME = "otelprof"
"""``spyName`` sent with each profile; becomes Pyroscope's ``pyroscope_spy`` label."""

_APP_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-/")


class PyroscopeExporter(HttpExporter):
    """Sends each kept profile to a Pyroscope server's ``/ingest`` endpoint.

    Off by default; turned on by ``OTELPROF_PYROSCOPE_URL`` (``pyroscope_url=``).
    When on, every profile that is queued for export also gets the span attribute
    ``pyroscope.profile.id`` = its span id, which Grafana's "traces to profiles" reads.

    Example::

        exporter = PyroscopeExporter("http://pyroscope:4040", tenant_id="team-a")
        exporter.submit(summary, session, SpanFacts(name="GET /items/{id}"))

    Args:
        url: base URL of the Pyroscope server (or Grafana Cloud Profiles endpoint);
            ``user:password@`` in it becomes HTTP basic auth and is never logged.
        service_name: ``service_name`` label for spans whose resource has no
            ``service.name`` (default ``unknown_service``). Grafana's default profile
            query is ``{service_name="<the span's service.name>"}``.
        tenant_id: sent as ``X-Scope-OrgID`` (multi-tenant Pyroscope).
        queue_size: profiles that may wait (default 256); more are dropped and counted,
            as are profiles beyond ``QUEUED_SAMPLES`` samples in all (see the base).
        batch_size: at most this many profiles per request (default 32).
        timeout: seconds per HTTP request (default 5).
        transport: an httpx transport (tests).

    Raises:
        ValueError: ``url`` is not an absolute http(s) URL.
    """

    def __init__(
        self,
        url: str,
        *,
        service_name: str | None = None,
        tenant_id: str | None = None,
        queue_size: int = 256,
        batch_size: int = 32,
        timeout: float = 5.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("the Pyroscope URL must be an absolute http(s) URL")
        auth: tuple[str, str] | None = None
        if parts.username is not None:
            auth = (unquote(parts.username), unquote(parts.password or ""))
        netloc = parts.netloc.rsplit("@", 1)[-1]
        self.ingest_url = urlunsplit(
            (parts.scheme, netloc, parts.path.rstrip("/") + "/ingest", "", "")
        )
        self._headers = {"Content-Type": "application/octet-stream"}  # a gzipped pprof
        if tenant_id:
            self._headers["X-Scope-OrgID"] = tenant_id
        self._service_name = service_name or "unknown_service"
        # Not retried: the profile is in otelprof's own store anyway.
        super().__init__(
            thread_name="otelprof-pyroscope",
            prefix="pyroscope",
            queue_size=queue_size,
            batch_size=batch_size,
            timeout=timeout,
            transport=transport,
            auth=auth,
        )

    def span_attributes(self, summary: ProfileSummary) -> Mapping[str, str]:
        """``{"pyroscope.profile.id": <span id>}``: what Grafana's span query selects."""
        return {PYROSCOPE_PROFILE_ID: summary.span_id}

    def _send(self, client: httpx.Client, items: Sequence[QueuedProfile]) -> None:
        groups: dict[str, list[QueuedProfile]] = {}
        for item in items:
            service = item.span.service_name or self._service_name
            groups.setdefault(service, []).append(item)
        for service, group in groups.items():
            body: bytes | None = None
            with fail_open("pyroscope.encode"):
                body = gzip.compress(encode_pprof(group), compresslevel=6)
            if body is None:
                count("pyroscope.failed", len(group))
                continue
            start = min(item.summary.start_time for item in group)
            end = max(item.summary.start_time + item.session.duration for item in group)
            params = {
                "name": ingest_name(service),
                "from": str(math.floor(start)),
                "until": str(max(math.ceil(end), math.floor(start) + 1)),
                "format": "pprof",
                "spyName": SPY_NAME,
            }
            try:
                self._post(
                    client, self.ingest_url, params=params, content=body, headers=self._headers
                )
            except Exception as exc:
                self._failed(len(group), exc)
            else:
                count("pyroscope.exported", len(group))


def ingest_name(service_name: str) -> str:
    """The ``name`` query parameter: ``<app>{service_name=<service>}``.

    Pyroscope's label-set parser takes no escapes: the application name may hold only
    letters, digits and ``_ . - /``, and a label value ends at ``,`` or ``}``; other
    characters become ``_``.
    """
    app = "".join(ch if ch in _APP_NAME_OK else "_" for ch in service_name) or "unknown_service"
    value = "".join("_" if ch in ",{}" else ch for ch in service_name).strip() or app
    return f"{app}{{service_name={value}}}"


def encode_pprof(items: Iterable[QueuedProfile]) -> bytes:
    """One uncompressed pprof ``Profile`` holding the samples of ``items``.

    Each pyinstrument frame becomes a ``Function`` (``Class.method (path:first_line)``,
    file name, first line) and a ``Location`` at the frame's current line. Stacks are
    written leaf first, as pprof wants. Samples carry the labels ``span_id``,
    ``span_name`` and ``http_route`` (the last two when known).
    """
    builder = _PprofBuilder()
    for item in items:
        builder.add(item)
    return builder.encode()


class _PprofBuilder:
    """Interns strings, functions and locations; sums values per (stack, labels)."""

    def __init__(self) -> None:
        self.strings: dict[str, int] = {"": 0}
        self.functions: dict[tuple[str, str, int], int] = {}
        self.function_rows: list[tuple[int, int, int, int, int]] = []
        self.locations: dict[tuple[int, int], int] = {}
        self.location_rows: list[tuple[int, int, int]] = []
        self.samples: dict[tuple[tuple[int, ...], tuple[tuple[int, int], ...]], int] = {}
        self.start = math.inf
        self.end = 0.0
        self.period_ns = 0

    def string(self, text: str) -> int:
        index = self.strings.get(text)
        if index is None:
            index = self.strings[text] = len(self.strings)
        return index

    def add(self, item: QueuedProfile) -> None:
        session = item.session
        self.start = min(self.start, item.summary.start_time)
        self.end = max(self.end, item.summary.start_time + session.duration)
        self.period_ns = max(self.period_ns, round(session.min_interval * 1e9))
        labels = [(self.string("span_id"), self.string(item.summary.span_id))]
        if item.span.name:
            labels.append((self.string("span_name"), self.string(item.span.name)))
        if item.summary.route:
            labels.append((self.string("http_route"), self.string(item.summary.route)))
        label_key = tuple(labels)
        location = functools.partial(self._location, session)
        for location_ids, nanoseconds in stack_samples(session, location):
            key = (location_ids, label_key)
            self.samples[key] = self.samples.get(key, 0) + nanoseconds

    def _location(self, session: Session, frame_info: str) -> int:
        frame = frame_parts(frame_info)
        key = (frame.name, frame.path, frame.first_line)
        function = self.functions.get(key)
        if function is None:
            shown = (
                f"{frame.name} ({session.shorten_path(frame.path)}:{frame.first_line})"
                if frame.path
                else frame.name
            )
            function = self.functions[key] = len(self.function_rows) + 1
            self.function_rows.append(
                (
                    function,
                    self.string(shown),
                    self.string(frame.bare_name or frame.name),
                    self.string(frame.path),
                    frame.first_line,
                )
            )
        line = frame.line
        location_key = (function, line)
        location = self.locations.get(location_key)
        if location is None:
            location = self.locations[location_key] = len(self.location_rows) + 1
            self.location_rows.append((location, function, line))
        return location

    def encode(self) -> bytes:
        out = bytearray()
        wall, nanoseconds = self.string(SAMPLE_TYPE[0]), self.string(SAMPLE_TYPE[1])
        value_type = _message([(1, wall), (2, nanoseconds)])
        _field_bytes(out, 1, value_type)  # sample_type
        for (location_ids, labels), value in self.samples.items():
            sample = bytearray()
            _field_bytes(sample, 1, _packed(location_ids))
            _field_bytes(sample, 2, _packed((value,)))
            for key, value_index in labels:
                _field_bytes(sample, 3, _message([(1, key), (2, value_index)]))
            _field_bytes(out, 2, bytes(sample))
        for location_id, function_id, line in self.location_rows:
            location = bytearray(_message([(1, location_id)]))
            _field_bytes(location, 4, _message([(1, function_id), (2, line)]))
            _field_bytes(out, 4, bytes(location))
        for function_id, name, system_name, filename, start_line in self.function_rows:
            row = [(1, function_id), (2, name), (3, system_name), (4, filename), (5, start_line)]
            _field_bytes(out, 5, _message(row))
        for text in self.strings:  # dicts keep insertion order: index order
            _field_bytes(out, 6, text.encode("utf-8"))
        start = 0.0 if self.start == math.inf else self.start
        # Epoch seconds as floats hold microseconds, not nanoseconds: round to those.
        start_us, duration_us = round(start * 1e6), max(0, round((self.end - start) * 1e6))
        out += _message([(9, start_us * 1000), (10, duration_us * 1000)])
        _field_bytes(out, 11, value_type)  # period_type
        out += _message([(12, self.period_ns)])
        return bytes(out)


# Protocol buffers wire format: just what pprof's profile.proto needs (varints and
# length-delimited fields), so no protobuf runtime or generated code is required.


def _varint(out: bytearray, value: int) -> None:
    value &= (1 << 64) - 1  # int64 negatives as two's complement, like protobuf
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _message(fields: Iterable[tuple[int, int]]) -> bytes:
    """Varint fields; zero values are left out, as proto3 does."""
    out = bytearray()
    for number, value in fields:
        if value:
            _varint(out, number << 3)
            _varint(out, value)
    return bytes(out)


def _field_bytes(out: bytearray, number: int, data: bytes) -> None:
    _varint(out, (number << 3) | 2)
    _varint(out, len(data))
    out += data


def _packed(values: Iterable[int]) -> bytes:
    out = bytearray()
    for value in values:
        _varint(out, value)
    return bytes(out)
