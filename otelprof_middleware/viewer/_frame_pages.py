"""The frames around pyinstrument's page: one profile, and one route's baseline.

Each is a header (breadcrumbs, the request's or the route's facts, links to the other
formats and pages) above an ``<iframe>`` of pyinstrument's own page (``.../flame``).
"""

from __future__ import annotations

from collections.abc import Sequence
from string import Template
from urllib.parse import urlencode

from .._record import ProfileSummary
from .._time import utc
from . import _svg
from ._format import ms_text, plural
from ._html import (
    CRUMB,
    FRAME_STYLE,
    Markup,
    baseline_path,
    diff_path,
    facts,
    fill,
    flame_path,
    join,
    link,
    page,
    profile_path,
    request_name,
    trace_crumb,
    trace_path,
)
from ._query import BASELINE_LIMIT

__all__ = ["baseline_frame", "profile_frame"]

_KEPT_BECAUSE = {
    "slow": "slow for its route",
    "error": "it failed",
    "triggered": "asked for (trigger)",
    "min_duration": "over min_duration_ms",
}
_MODES = {"hook": "pyinstrument hook", "always_on": "always-on sampler"}
_FORMATS = ("text", "speedscope", "json", "folded")

_PROFILE_HEADING = Template(
    """<header>
<nav class="crumbs">$home$crumb$trace${crumb}this request</nav>
<h1>$method <span class="mono">$route</span> <span$status_class>$status</span> · $duration ms</h1>
"""
)
_BASELINE_HEADING = Template(
    """<header>
<nav class="crumbs">$home${crumb}route baseline</nav>
<h1>Baseline of <span class="mono">$route</span>: the $requests most recently kept, \
combined</h1>
"""
)
_HEADER_END = Template('<p class="links">$links</p>\n</header>\n')
_IFRAME = Template('<iframe src="$src" title="$title"></iframe>\n')
_MONO = Template('<span class="mono">$text</span>')
_MUTED = Template('<span class="muted">$text</span>')


def _mono(text: str) -> Markup:
    return fill(_MONO, text=text)


def _muted(text: str) -> Markup:
    return fill(_MUTED, text=text)


def _framed(
    title: str, heading: Markup, links: Sequence[Markup], src: str, frame_title: str
) -> str:
    header = heading + fill(_HEADER_END, links=join(links, " · "))
    frame = fill(_IFRAME, src=src, title=frame_title)
    return page(title, frame, heading=header, style=FRAME_STYLE)


def profile_frame(prefix: str, s: ProfileSummary) -> str:
    """One profile: its request's facts and links, pyinstrument's page below."""
    heading = fill(
        _PROFILE_HEADING,
        home=link(prefix, "otelprof: all profiles"),
        crumb=CRUMB,
        trace=trace_crumb(prefix, s.trace_id),
        method=s.method,
        route=s.route or "(no route matched)",
        status_class=Markup(' class="status-error"' if s.status_code >= 500 else ""),
        status=s.status_code,
        duration=f"{s.duration_ms:.1f}",
    )
    mode = _MODES.get(s.mode, s.mode)
    kept = s.kept_reason and f"{s.kept_reason} ({_KEPT_BECAUSE.get(s.kept_reason, '?')})"
    heading += facts(
        [
            ("Trace id", _mono(s.trace_id)),
            ("Span id", _mono(s.span_id)),
            ("Service", s.service or _muted("—")),
            ("When (UTC)", _mono(utc(s.start_time))),
            ("Mode", f"{mode}, every {s.interval_ms:g} ms"),
            ("Samples", str(s.sample_count)),
            ("Kept because", kept or _muted("not recorded")),
        ]
    )
    links = [link(trace_path(prefix, s.trace_id), "trace page", "every profiled span of it")]
    if s.route:
        links.append(link(diff_path(prefix, s), "this request vs its route"))
        links.append(link(baseline_path(prefix, s.route), "route baseline", "recent combined"))
    formats = join([link(profile_path(prefix, s, fmt), fmt) for fmt in _FORMATS], " ")
    flame = flame_path(prefix, s)
    links.append(Markup("formats: ") + formats)
    links.append(link(flame, "flame graph alone"))
    links.append(link(prefix, "all profiles"))
    title = f"{request_name(s)} {ms_text(s.duration_ms)} · otelprof"
    return _framed(title, heading, links, flame, f"flame graph of {request_name(s)}")


def baseline_frame(prefix: str, route: str, limit: int, summaries: Sequence[ProfileSummary]) -> str:
    """A route's baseline: what it combines, links, pyinstrument's page below."""
    requests = plural(len(summaries), "request")
    durations = sorted(s.duration_ms for s in summaries)
    heading = fill(
        _BASELINE_HEADING,
        home=link(prefix, "otelprof: all profiles"),
        crumb=CRUMB,
        route=route,
        requests=requests,
    )
    heading += facts(
        [
            ("Methods", ", ".join(sorted({s.method for s in summaries}))),
            ("Median", f"{_svg.percentile(durations, 50):.1f} ms"),
            ("95th percentile", f"{_svg.percentile(durations, 95):.1f} ms"),
            ("Slowest", f"{durations[-1]:.1f} ms"),
            ("From (UTC)", _mono(utc(min(s.start_time for s in summaries)))),
            ("To (UTC)", _mono(utc(max(s.start_time for s in summaries)))),
        ]
    )
    extra = {} if limit == BASELINE_LIMIT else {"limit": str(limit)}
    formats = join(
        [
            link(baseline_path(prefix, route, extra={**extra, "format": fmt}), fmt)
            for fmt in _FORMATS
        ],
        " ",
    )
    flame = baseline_path(prefix, route, flame=True, extra=extra)
    route_index = prefix + "?" + urlencode({"route": route, "order": "slowest"})
    links = [
        link(route_index, "this route's profiles", "slowest first"),
        Markup("formats: ") + formats,
        link(flame, "flame graph alone"),
        link(prefix, "all profiles"),
    ]
    title = f"Baseline {route} · {requests} · otelprof"
    return _framed(title, heading, links, flame, f"flame graph of the baseline of {route}")
