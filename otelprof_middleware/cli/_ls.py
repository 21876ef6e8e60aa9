"""``otelprof ls``: the stored profiles as a table or as JSON."""

from __future__ import annotations

import argparse
import json
import sys
import unicodedata
from collections.abc import Sequence

from .._record import ProfileSummary
from .._time import utc
from ..stores._base import redact_url
from ._common import CommandExit, load_config, open_profile_store, store_url, write_stdout

__all__ = ["list_profiles", "table"]


def list_profiles(args: argparse.Namespace) -> int:
    """Run ``ls``: print the profiles that match, newest or slowest first."""
    config = load_config()
    url = store_url(args, config)
    store = open_profile_store(url, config, must_exist=True)
    try:
        summaries = store.list(
            limit=args.limit,
            route=args.route,
            min_duration_ms=args.min_duration_ms,
            order="slowest" if args.slowest else "newest",
        )
    except Exception as exc:
        raise CommandExit(1, f"cannot read the profile store {redact_url(url)}: {exc}") from None
    finally:
        store.close()
    if args.json:
        write_stdout(json.dumps({"profiles": [s.to_json() for s in summaries]}, indent=1) + "\n")
    elif summaries:
        write_stdout(table(summaries))
    else:
        print("otelprof: no profiles match", file=sys.stderr)
    return 0


def table(summaries: Sequence[ProfileSummary]) -> str:
    """The summaries as aligned text columns, a header line first."""
    header = (
        "TIME (UTC)",
        "METHOD",
        "ROUTE",
        "STATUS",
        "DURATION_MS",
        "KEPT",
        "TRACE_ID",
        "SPAN_ID",
    )
    rows = [
        (
            utc(s.start_time),
            s.method,
            s.route or "(no route matched)",
            str(s.status_code),
            f"{s.duration_ms:.1f}",
            s.kept_reason or "-",  # "-": stored by an older version, which did not record it
            s.trace_id,
            s.span_id,
        )
        for s in summaries
    ]
    widths = [max(_width(row[i]) for row in (header, *rows)) for i in range(len(header))]
    right = {3, 4}
    lines = []
    for row in (header, *rows):
        cells = []
        for i, cell in enumerate(row):
            pad = " " * (widths[i] - _width(cell))
            cells.append(pad + cell if i in right else cell + pad)
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def _width(text: str) -> int:
    """Columns ``text`` takes in a terminal: wide (CJK) characters take two, combining
    marks none (``str.ljust`` counts characters, which misaligned the table)."""
    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
        for c in text
    )
