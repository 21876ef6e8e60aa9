"""A local Pyroscope ingest receiver for the tests, and a pprof decoder independent of
the exporter's.

No Pyroscope server can be installed here, so the tests run this one: a real HTTP server
on 127.0.0.1 that checks each request against Pyroscope's documented ingest API
(``POST /ingest``, required ``name``/``from``/``until``, the ``name`` label-set grammar
of ``api/model/labelset`` in grafana/pyroscope, ``format=pprof`` with a gzipped pprof
body) and decodes the body with protobuf's own runtime, from a descriptor of pprof's
``profile.proto`` written here, independently of the exporter's hand-written encoder.
"""

from __future__ import annotations

import gzip
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from .http_receiver import QuietHandler, receiving

descriptor_pb2 = pytest.importorskip("google.protobuf.descriptor_pb2")
message_factory = pytest.importorskip("google.protobuf.message_factory")
descriptor_pool = pytest.importorskip("google.protobuf.descriptor_pool")

# --- pprof decoding with the protobuf runtime --------------------------------------


def _profile_class() -> Any:
    """The ``Profile`` message class of pprof's profile.proto (the fields we send)."""
    f = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="otelprof_test_profile.proto", package="t")
    file.syntax = "proto3"

    def message(name: str, *fields: tuple[str, int, int, int, str]) -> None:
        msg = file.message_type.add(name=name)
        for field_name, number, kind, label, type_name in fields:
            entry = msg.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                entry.type_name = type_name

    one, many = f.LABEL_OPTIONAL, f.LABEL_REPEATED
    i64, u64, s, m = f.TYPE_INT64, f.TYPE_UINT64, f.TYPE_STRING, f.TYPE_MESSAGE
    message("ValueType", ("type", 1, i64, one, ""), ("unit", 2, i64, one, ""))
    message("Label", ("key", 1, i64, one, ""), ("str", 2, i64, one, ""))
    message(
        "Sample",
        ("location_id", 1, u64, many, ""),
        ("value", 2, i64, many, ""),
        ("label", 3, m, many, ".t.Label"),
    )
    message("Line", ("function_id", 1, u64, one, ""), ("line", 2, i64, one, ""))
    message("Location", ("id", 1, u64, one, ""), ("line", 4, m, many, ".t.Line"))
    message(
        "Function",
        ("id", 1, u64, one, ""),
        ("name", 2, i64, one, ""),
        ("system_name", 3, i64, one, ""),
        ("filename", 4, i64, one, ""),
        ("start_line", 5, i64, one, ""),
    )
    message(
        "Profile",
        ("sample_type", 1, m, many, ".t.ValueType"),
        ("sample", 2, m, many, ".t.Sample"),
        ("location", 4, m, many, ".t.Location"),
        ("function", 5, m, many, ".t.Function"),
        ("string_table", 6, s, many, ""),
        ("time_nanos", 9, i64, one, ""),
        ("duration_nanos", 10, i64, one, ""),
        ("period_type", 11, m, one, ".t.ValueType"),
        ("period", 12, i64, one, ""),
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("t.Profile"))


Profile = _profile_class()


@dataclass
class Decoded:
    """A decoded pprof, with stacks as function names (root first)."""

    raw: Any
    strings: list[str]
    stacks: list[tuple[list[str], int, dict[str, str]]]  # names root first, value, labels
    lines: list[tuple[str, int]]  # (function name, line) of every location

    def functions(self) -> set[str]:
        return {name for names, _, _ in self.stacks for name in names}


def decode(body: bytes) -> Decoded:
    raw = Profile.FromString(gzip.decompress(body) if body[:2] == b"\x1f\x8b" else body)
    strings = list(raw.string_table)
    functions = {fn.id: strings[fn.name] for fn in raw.function}
    locations = {loc.id: loc for loc in raw.location}
    stacks = []
    for sample in raw.sample:
        names = [functions[locations[i].line[0].function_id] for i in sample.location_id]
        labels = {strings[label.key]: strings[label.str] for label in sample.label}
        stacks.append((list(reversed(names)), sample.value[0], labels))
    lines = [(functions[loc.line[0].function_id], loc.line[0].line) for loc in raw.location]
    return Decoded(raw, strings, stacks, lines)


# --- a receiver that checks Pyroscope's documented ingest request ---------------------

_APP = re.compile(r"[A-Za-z0-9_.\-/]+")
_LABEL_NAME = re.compile(r"[A-Za-z0-9_.]+")


def parse_name(name: str) -> tuple[str, dict[str, str]]:
    """Pyroscope's ``name`` grammar: ``app{key=value,...}``; raises ValueError."""
    app, brace, rest = name.partition("{")
    if not _APP.fullmatch(app.strip()):
        raise ValueError(f"invalid application name {app!r}")
    labels: dict[str, str] = {}
    if brace:
        if not rest.endswith("}"):
            raise ValueError("unterminated label set")
        for pair in filter(None, rest[:-1].split(",")):
            key, eq, value = pair.partition("=")
            if not eq or not _LABEL_NAME.fullmatch(key.strip()):
                raise ValueError(f"invalid label {pair!r}")
            labels[key.strip()] = value.strip()
    return app.strip(), labels


@dataclass
class Received:
    path: str
    params: dict[str, str]
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    url: str
    requests: list[Received] = field(default_factory=list)
    status: int = 200
    gate: threading.Event = field(default_factory=threading.Event)
    errors: list[str] = field(default_factory=list)


@contextmanager
def serve() -> Iterator[Receiver]:
    """A running receiver (the ``pyroscope_receiver`` fixture of ``conftest.py``)."""
    state = Receiver(url="")

    class Handler(QuietHandler):
        def do_POST(self) -> None:
            state.gate.wait(10)
            parts = urlsplit(self.path)
            params = {k: v[0] for k, v in parse_qs(parts.query).items()}
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            problem = None
            try:
                if parts.path != "/ingest":
                    problem = f"path {parts.path}"
                elif not {"name", "from", "until"} <= params.keys():
                    problem = f"missing required parameters: {sorted(params)}"
                else:
                    parse_name(params["name"])
                    if not params["from"].isdigit() or not params["until"].isdigit():
                        problem = "from/until must be UNIX seconds"
                    elif params.get("format") == "pprof":
                        decode(body)
            except Exception as exc:
                problem = repr(exc)
            if problem:
                state.errors.append(problem)
            state.requests.append(Received(parts.path, params, dict(self.headers), body))
            status = 400 if problem else state.status
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

    with receiving(state, Handler):
        yield state
