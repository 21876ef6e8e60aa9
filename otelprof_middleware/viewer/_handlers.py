"""One function per route: read the store, check the query, pick the page or format."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

from .._failsafe import log_failure
from .._record import ProfileSummary
from ..render import FORMATS
from . import _svg, baseline
from ._frame_pages import baseline_frame, profile_frame
from ._html import profile_path
from ._http import FRAME_CSP, Abort, ViewerResponse, html_response, json_response
from ._index_page import index_page
from ._query import (
    BASELINE_LIMIT,
    MAX_BASELINE_LIMIT,
    MAX_LIMIT,
    Filters,
    Query,
    bounded_int,
    format_of,
    route_of,
    span_id_of,
)
from ._reading import StoreReader
from ._render import render_record, render_session
from ._trace_pages import diff_page, trace_page

__all__ = ["INDEX_FORMATS", "Call", "baseline_page", "diff", "index", "profile"]

INDEX_FORMATS = ("html", "json")
"""Formats of the index and of a trace's list of profiles."""

MAX_DIFF_ROWS = 200
_ANY_FORMAT = f"expected one of {', '.join(FORMATS)}"
_SEVERAL = "this trace has several profiles here: add ?span_id=...\n"
_NO_BASELINE_YET = "no kept profiles of this route yet.\n"


@dataclass(frozen=True, slots=True)
class Call:
    """One request, as a route's function sees it.

    Args:
        query: the parsed query string.
        store: the store, failures turned into answers.
        links: where the viewer's pages are, for links in pages (mount point + prefix).
        urls: where they are for the absolute ``url`` of each JSON row.
    """

    query: Query
    store: StoreReader
    links: str
    urls: str


def index(call: Call) -> ViewerResponse:
    """``{prefix}``: the recent profiles, filtered."""
    fmt = format_of(call.query, INDEX_FORMATS, "the index speaks html or json")
    filters = Filters.parse(call.query)
    summaries = call.store.summaries(
        limit=filters.limit,
        route=filters.route,
        min_duration_ms=filters.min_duration_ms,
        order=filters.order,
    )
    if fmt == "json":
        return _json_list(call, summaries)
    distribution = summaries
    if len(summaries) == filters.limit and (filters.limit < MAX_LIMIT or filters.order != "newest"):
        # The histograms describe the newest stored profiles the filters match (up to
        # MAX_LIMIT), not only the rows of this page, and whatever its order: with
        # order=slowest&limit=1000 they described the slowest alone.
        with contextlib.suppress(Abort):  # logged and counted; the page goes on without
            distribution = call.store.summaries(
                limit=MAX_LIMIT, route=filters.route, min_duration_ms=filters.min_duration_ms
            )
    return html_response(index_page(call.links, filters, summaries, distribution))


def profile(call: Call, trace_id: str, *, bare: bool) -> ViewerResponse:
    """``{prefix}/{trace_id}`` (the trace page, or one span's profile) and ``.../flame``."""
    fmt = format_of(call.query, FORMATS, _ANY_FORMAT)
    if bare and fmt != "html":
        raise Abort(400, "the flame page is html; use ?format= on the profile page.\n")
    span_id = span_id_of(call.query)
    records = call.store.profiles(trace_id, span_id)
    if not records:
        raise Abort(
            404,
            "no profile for this trace"
            + (" and span" if span_id else "")
            + ": it was not kept, not written yet, or has been evicted.\n",
        )
    summaries = [record.summary for record in records]
    if fmt == "html" and not bare and span_id is None:
        return html_response(trace_page(call.links, trace_id, fmt, summaries))
    if len(records) > 1:
        if bare:
            raise Abort(400, _SEVERAL)
        if fmt == "json":
            return _json_list(call, summaries)
        return html_response(trace_page(call.links, trace_id, fmt, summaries))
    if fmt == "html" and not bare:
        return html_response(profile_frame(call.links, records[0].summary), FRAME_CSP)
    return render_record(records[0], fmt)


def baseline_page(call: Call, *, bare: bool) -> ViewerResponse:
    """``{prefix}/route?route=`` (framed) and ``{prefix}/route/flame?route=``."""
    route = route_of(call.query)
    if not route:
        raise Abort(400, "route is required, e.g. ?route=/items/{item_id}\n")
    fmt = format_of(call.query, FORMATS, _ANY_FORMAT)
    if bare and fmt != "html":
        raise Abort(400, "the flame page is html; use ?format= on the baseline page.\n")
    limit = bounded_int(call.query, "limit", BASELINE_LIMIT, MAX_BASELINE_LIMIT)
    if fmt == "html" and not bare:
        summaries = call.store.route_summaries(route, limit)
        if not summaries:
            raise Abort(404, _NO_BASELINE_YET)
        return html_response(baseline_frame(call.links, route, limit, summaries), FRAME_CSP)
    sessions = call.store.route_sessions(route, limit)
    if not sessions:
        raise Abort(404, _NO_BASELINE_YET)
    combined = baseline.combine(sessions)
    combined.target_description = (
        f"{route}: baseline of {len(sessions)} recent request{'s' if len(sessions) > 1 else ''}"
    )
    return render_session(combined, fmt, "baseline")


def diff(call: Call, trace_id: str) -> ViewerResponse:
    """``{prefix}/{trace_id}/diff``: the request against its route's baseline."""
    fmt = format_of(call.query, INDEX_FORMATS, "the diff speaks html or json")
    span_id = span_id_of(call.query)
    limit = bounded_int(call.query, "limit", BASELINE_LIMIT, MAX_BASELINE_LIMIT)
    records = call.store.get(trace_id, span_id)
    if not records:
        raise Abort(404, "no profile for this trace.\n")
    if len(records) > 1:
        raise Abort(400, _SEVERAL)
    record = records[0]
    summary = record.summary
    if not summary.route:
        raise Abort(404, "this request matched no route, so it has no baseline.\n")
    # Only profiles taken the same way compare: the hook records frames (the event
    # loop's, C functions) that the always-on sampler never shows, and the other way round.
    sessions = call.store.route_sessions(summary.route, limit, exclude=summary, mode=summary.mode)
    try:
        # No other kept profile of the route yet (the span link is made when the first
        # is kept): the page says so, with nothing to compare, rather than a 404.
        session = record.session()
        rows = baseline.diff(session, sessions) if sessions else []
        tree = baseline.diff_tree(session, sessions) if fmt == "html" and sessions else None
    except Exception as exc:
        log_failure("viewer.diff", exc)
        raise Abort(422, "the comparison failed; the error was logged.\n") from None
    if fmt == "json":
        return json_response(
            {
                "trace_id": summary.trace_id,
                "span_id": summary.span_id,
                "route": summary.route,
                "baseline_profiles": len(sessions),
                "functions": [row.to_json() for row in rows[:MAX_DIFF_ROWS]],
            }
        )
    flame = _svg.flame_diff(tree) if tree is not None else ""
    return html_response(diff_page(call.links, summary, len(sessions), rows, flame))


def _json_list(call: Call, summaries: Sequence[ProfileSummary]) -> ViewerResponse:
    rows = [{**s.to_json(), "url": profile_path(call.urls, s)} for s in summaries]
    return json_response({"profiles": rows})
