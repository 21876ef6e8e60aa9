"""A local OTLP/HTTP profiles receiver for the tests, and the rules it checks.

No OTLP profiles receiver can be installed here (the OTel Collector and Grafana Pyroscope
are Go programs shipped as binaries or containers, not in PyPI, npm or Debian), so the
tests run this one: a real HTTP server on 127.0.0.1 that serves the Collector's
``POST /v1development/profiles`` (``defaultProfilesURLPath`` in
``receiver/otlpreceiver/factory.go``), accepts ``application/x-protobuf`` only (the
Collector also takes ``application/json``; we never send it), decodes the body with
opentelemetry-proto's generated classes (not with our encoder) and checks it against
:func:`violations`: the rules of the proto's comments and of what Pyroscope's OTLP ingest
(``pkg/ingester/otlp/convert.go``) requires to convert a profile.
"""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesPartialSuccess,
    ExportProfilesServiceRequest,
    ExportProfilesServiceResponse,
)
from opentelemetry.proto.profiles.v1development.profiles_pb2 import ProfilesDictionary

from .http_receiver import QuietHandler, receiving

PATH = "/v1development/profiles"


def violations(request: ExportProfilesServiceRequest) -> list[str]:
    """Every rule the request breaks (empty: valid).

    - ``dictionary`` is present and each of its tables starts with its zero entry
      ("``table[0]`` must always be zero value ... and present", profiles.proto);
    - every ``*_index``, ``*_indices`` and ``*_strindex`` is within its table (Pyroscope's
      ``at()`` rejects the profile otherwise);
    - every profile has a sample type; a period type and a period, which Pyroscope needs
      to name the profile (``<type>:<unit>:<period type>:<period unit>``);
    - every sample has one value per sample type (one), and timestamps, if any, as many;
    - links hold a 16-byte trace id and an 8-byte span id, neither all zero;
    - ``time_unix_nano`` is set.
    """
    problems: list[str] = []
    if not request.HasField("dictionary"):
        return ["no dictionary"]
    d = request.dictionary
    tables = {
        "mapping_table": d.mapping_table,
        "location_table": d.location_table,
        "function_table": d.function_table,
        "link_table": d.link_table,
        "attribute_table": d.attribute_table,
        "stack_table": d.stack_table,
    }
    for name, table in tables.items():
        if not len(table):
            problems.append(f"{name} has no zero entry")
        elif table[0].ByteSize() != 0:
            problems.append(f"{name}[0] is not the zero value")
    if not len(d.string_table) or d.string_table[0] != "":
        problems.append('string_table[0] is not ""')

    def check(kind: str, index: int, table: Any) -> None:
        if not 0 <= index < len(table):
            problems.append(f"{kind} index {index} out of range ({len(table)})")

    for function in d.function_table:
        for index in (
            function.name_strindex,
            function.system_name_strindex,
            function.filename_strindex,
        ):
            check("string", index, d.string_table)
    for location in d.location_table:
        check("mapping", location.mapping_index, d.mapping_table)
        for line in location.lines:
            check("function", line.function_index, d.function_table)
        for index in location.attribute_indices:
            check("attribute", index, d.attribute_table)
    for mapping in d.mapping_table:
        check("string", mapping.filename_strindex, d.string_table)
    for stack in d.stack_table:
        for index in stack.location_indices:
            check("location", index, d.location_table)
    for attribute in d.attribute_table:
        check("string", attribute.key_strindex, d.string_table)
        check("string", attribute.unit_strindex, d.string_table)
    for link in list(d.link_table)[1:]:
        if len(link.trace_id) != 16 or not any(link.trace_id):
            problems.append("a link's trace id is not 16 non-zero bytes")
        if len(link.span_id) != 8 or not any(link.span_id):
            problems.append("a link's span id is not 8 non-zero bytes")
    for resource_profiles in request.resource_profiles:
        for scope_profiles in resource_profiles.scope_profiles:
            for profile in scope_profiles.profiles:
                if not profile.HasField("sample_type"):
                    problems.append("a profile has no sample type")
                if not profile.HasField("period_type") or profile.period <= 0:
                    problems.append("a profile has no period type or period")
                for value_type in (profile.sample_type, profile.period_type):
                    check("string", value_type.type_strindex, d.string_table)
                    check("string", value_type.unit_strindex, d.string_table)
                if profile.time_unix_nano == 0:
                    problems.append("a profile has no time_unix_nano")
                for index in profile.attribute_indices:
                    check("attribute", index, d.attribute_table)
                for sample in profile.samples:
                    check("stack", sample.stack_index, d.stack_table)
                    check("link", sample.link_index, d.link_table)
                    for index in sample.attribute_indices:
                        check("attribute", index, d.attribute_table)
                    if len(sample.values) != 1:
                        problems.append(f"a sample has {len(sample.values)} values, not 1")
                    if sample.timestamps_unix_nano and len(sample.timestamps_unix_nano) != len(
                        sample.values
                    ):
                        problems.append("a sample's timestamps and values differ in length")
    return problems


def stack_names(dictionary: ProfilesDictionary, stack_index: int) -> list[tuple[str, str, int]]:
    """(function name, file, line) of each frame of a stack, root first."""
    strings = dictionary.string_table
    frames = []
    for location_index in dictionary.stack_table[stack_index].location_indices:
        location = dictionary.location_table[location_index]
        line = location.lines[0]
        function = dictionary.function_table[line.function_index]
        frames.append(
            (strings[function.name_strindex], strings[function.filename_strindex], line.line)
        )
    return frames[::-1]


@dataclass
class Reply:
    """What the receiver answers to one request."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    rejected: int = 0
    message: str = ""


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    request: ExportProfilesServiceRequest | None
    problems: list[str]


@dataclass
class OtlpReceiver:
    """The receiver's state: requests received, scripted replies, a gate to hold them."""

    url: str = ""
    received: list[Received] = field(default_factory=list)
    replies: list[Reply] = field(default_factory=list)  # consumed in order; then 200
    gate: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def endpoint(self) -> str:
        return self.url + PATH

    def requests(self) -> list[ExportProfilesServiceRequest]:
        with self.lock:
            return [r.request for r in self.received if r.request is not None]

    def problems(self) -> list[str]:
        with self.lock:
            return [p for r in self.received for p in r.problems]


@dataclass
class ReceivedProfile:
    """One profile as received, with the dictionary of its request and its resource."""

    profile: Any
    dictionary: ProfilesDictionary
    resource: dict[str, object]
    scope_name: str

    def links(self) -> set[tuple[str, str]]:
        table = self.dictionary.link_table
        return {
            (table[s.link_index].trace_id.hex(), table[s.link_index].span_id.hex())
            for s in self.profile.samples
        }

    def stacks(self) -> list[tuple[list[tuple[str, str, int]], int]]:
        return [
            (stack_names(self.dictionary, s.stack_index), sum(s.values))
            for s in self.profile.samples
        ]

    def total_ns(self) -> int:
        return sum(sum(s.values) for s in self.profile.samples)

    def string(self, index: int) -> str:
        return str(self.dictionary.string_table[index])

    def attributes(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for index in self.profile.attribute_indices:
            attribute = self.dictionary.attribute_table[index]
            value = attribute.value
            out[self.string(attribute.key_strindex)] = getattr(value, value.WhichOneof("value"))
        return out


def profiles_of(requests: list[ExportProfilesServiceRequest]) -> list[ReceivedProfile]:
    found = []
    for request in requests:
        for resource_profiles in request.resource_profiles:
            resource = {
                kv.key: getattr(kv.value, kv.value.WhichOneof("value"))
                for kv in resource_profiles.resource.attributes
            }
            for scope_profiles in resource_profiles.scope_profiles:
                for profile in scope_profiles.profiles:
                    found.append(
                        ReceivedProfile(
                            profile, request.dictionary, resource, scope_profiles.scope.name
                        )
                    )
    return found


@contextmanager
def serve() -> Iterator[OtlpReceiver]:
    """A running receiver (the ``otlp_receiver`` fixture of ``conftest.py``)."""
    state = OtlpReceiver()

    class Handler(QuietHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            state.gate.wait(10)
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            problems: list[str] = []
            request: ExportProfilesServiceRequest | None = None
            if self.path != PATH:
                problems.append(f"path {self.path}")
            if self.headers.get("Content-Type") != "application/x-protobuf":
                problems.append(f"content type {self.headers.get('Content-Type')}")
            try:
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportProfilesServiceRequest()
                request.ParseFromString(body)
                problems += violations(request)
            except Exception as exc:
                problems.append(f"undecodable body: {exc!r}")
                request = None
            with state.lock:
                reply = state.replies.pop(0) if state.replies else Reply()
                state.received.append(Received(self.path, dict(self.headers), request, problems))
            status = 400 if problems else reply.status
            response = ExportProfilesServiceResponse()
            if reply.rejected or reply.message:
                response.partial_success.CopyFrom(
                    ExportProfilesPartialSuccess(
                        rejected_profiles=reply.rejected, error_message=reply.message
                    )
                )
            payload = response.SerializeToString() if status == 200 else b""
            self.send_response(status)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

    with receiving(state, Handler):
        yield state
