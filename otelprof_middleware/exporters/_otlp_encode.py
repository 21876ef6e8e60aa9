"""The OTLP profiles a batch becomes: an ``ExportProfilesServiceRequest`` and its tables.

What :func:`encode_request` builds (sources and reasoning in ``docs/otlp-profiles.md``):

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

``opentelemetry-proto`` (the ``otlp`` extra) is imported by :func:`require_proto`, only
when the OTLP exporter is used.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .._identifiers import frame_parts
from ._http import QueuedProfile
from ._stacks import SAMPLE_TYPE, stack_samples

if TYPE_CHECKING:
    from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
        ExportProfilesServiceRequest,
    )

__all__ = ["SCOPE_NAME", "encode_request", "profile_id", "require_proto"]

SCOPE_NAME = "otelprof_middleware"
"""The ``InstrumentationScope`` name of every profile."""

# The sample type (SAMPLE_TYPE, wall/nanoseconds) is also the period type: Pyroscope
# names the profile by the period type, ``wall:nanoseconds:wall:nanoseconds``, profile
# name ``wall``.


def require_proto() -> tuple[ModuleType, ModuleType, ModuleType, ModuleType]:
    """Import opentelemetry-proto's generated classes the OTLP exporter needs.

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


def profile_id(trace_id: str, span_id: str) -> bytes:
    """The profile's 16-byte id, derived from its span: a retried send keeps its id."""
    return hashlib.blake2b(f"{trace_id}-{span_id}".encode(), digest_size=16).digest()


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


def _profile(dictionary: _Dictionary, item: QueuedProfile) -> Any:
    """The ``Profile`` of one kept request, its entries interned in ``dictionary``."""
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
    for locations, nanoseconds in stack_samples(session, dictionary.location):
        index = dictionary.stack(locations)
        values[index] = values.get(index, 0) + nanoseconds
    for index, nanoseconds in values.items():
        profile.samples.add(stack_index=index, link_index=link, values=[nanoseconds])
    return profile


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
