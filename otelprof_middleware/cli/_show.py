"""``otelprof show`` and ``otelprof export``: one stored profile, rendered, to stdout or
a file."""

from __future__ import annotations

import argparse
import os
import sys

from .._record import ProfileRecord, is_span_id, is_trace_id
from .._time import utc
from ..render import FORMATS, render
from ..stores._base import redact_url
from ._common import CommandExit, load_config, open_profile_store, store_url, write_stdout

__all__ = ["export_suffix_format", "render_record", "show"]

_EXPORT_SUFFIXES = (
    (".speedscope.json", "speedscope"),
    (".html", "html"),
    (".htm", "html"),
    (".json", "json"),
    (".txt", "text"),
    (".folded", "folded"),
)


def show(args: argparse.Namespace) -> int:
    """Run ``show`` or ``export`` (``args.command``); 0 when the profile was written."""
    trace_id: str = args.trace_id
    span_id: str | None = args.span_id
    if not is_trace_id(trace_id):
        raise CommandExit(
            2,
            f"malformed trace id {trace_id[:40]!r}: expected 32 lowercase hex digits, not all zero",
        )
    if span_id is not None and not is_span_id(span_id):
        raise CommandExit(
            2,
            f"malformed span id {span_id[:40]!r}: expected 16 lowercase hex digits, not all zero",
        )
    fmt: str = args.format or "text"
    output: str | None = getattr(args, "output", None)
    if args.command == "export" and args.format is None:
        by_name = export_suffix_format(output or "")
        if by_name is None:
            suffixes = ", ".join(suffix for suffix, _ in _EXPORT_SUFFIXES)
            raise CommandExit(
                2,
                f"cannot tell the format of {output!r} from its name: pass --format "
                f"({', '.join(FORMATS)}) or name the file {suffixes}",
            )
        fmt = by_name
    config = load_config()
    url = store_url(args, config)
    store = open_profile_store(url, config, must_exist=True)
    try:
        records = [
            r
            for r in store.get(trace_id, span_id)
            if r.summary.trace_id == trace_id and (span_id is None or r.summary.span_id == span_id)
        ]
    except Exception as exc:
        raise CommandExit(1, f"cannot read the profile store {redact_url(url)}: {exc}") from None
    finally:
        store.close()
    if not records:
        which = f"trace {trace_id}" + (f" span {span_id}" if span_id else "")
        raise CommandExit(
            1,
            f"no profile for {which} in {redact_url(url)}: it was not kept, not written "
            "yet, or has been evicted",
        )
    if len(records) > 1:
        choices = "\n".join(
            f"  --span-id {r.summary.span_id}  {utc(r.summary.start_time)}  "
            f"{r.summary.method} {r.summary.route}  {r.summary.duration_ms:.1f} ms"
            for r in records
        )
        raise CommandExit(
            2,
            f"trace {trace_id} crossed the service {len(records)} times; pick one "
            f"with --span-id:\n{choices}",
        )
    body = render_record(records[0], fmt)
    if args.command == "show" or output == "-":
        write_stdout(body)
        return 0
    assert output is not None
    data = body.encode("utf-8")
    try:
        with open(output, "wb") as file:
            file.write(data)
    except OSError as exc:
        raise CommandExit(1, f"cannot write {output}: {exc.strerror or exc}") from None
    print(f"otelprof: wrote {output} ({fmt}, {len(data)} bytes)", file=sys.stderr)
    return 0


def export_suffix_format(path: str) -> str | None:
    """The format ``export`` writes when none is given: by the suffix, html for a name
    without one (``-`` too), None for a suffix of another kind of file (``.svg``)."""
    lowered = path.lower()
    for suffix, fmt in _EXPORT_SUFFIXES:
        if lowered.endswith(suffix):
            return fmt
    return None if os.path.splitext(os.path.basename(lowered))[1] else "html"


def render_record(record: ProfileRecord, fmt: str) -> str:
    """The stored profile rendered as ``fmt``; exit 1 when corrupt or not renderable."""
    try:
        session = record.session()
    except ValueError as exc:
        raise CommandExit(1, f"the stored profile is corrupt: {exc}") from None
    try:
        body, _ = render(session, fmt)
    except Exception as exc:
        raise CommandExit(1, f"the profile could not be rendered as {fmt}: {exc}") from None
    return body
