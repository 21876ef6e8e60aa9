"""The trace page (every profiled span of one trace, as a waterfall) and the diff page (one
request against its route's baseline: a differential flame graph and function tables)."""

from __future__ import annotations

from collections.abc import Sequence
from string import Template

from .._record import ProfileSummary
from ._format import ms_text, plural
from ._html import (
    CRUMB,
    Markup,
    baseline_path,
    diff_path,
    fill,
    flame_path,
    join,
    kept_cell,
    link,
    page,
    profile_path,
    trace_crumb,
)
from .baseline import DiffRow

__all__ = ["diff_page", "trace_page"]

_NO_ROUTE = "(no route matched)"
_NO_SERVICE = Markup('<span class="muted">—</span>')

_TRACE_HEADING = Template(
    """<nav class="crumbs">$home${crumb}trace</nav>
<h1>Trace <span class="mono">$trace_id</span></h1>
"""
)
_TRACE_BODY = Template(
    """<p>$spans of this trace held in the store, $where, in start order, over $whole ms. \
Spans that were not profiled or not kept are not shown; start offsets come from each \
host's clock. Open a span for its flame graph.</p>
<table>
<thead><tr><th>Service</th><th>Span</th><th>Status</th><th>Start (ms)</th>\
<th>Duration (ms)</th><th>Kept</th><th>Waterfall</th><th></th></tr></thead>
<tbody>
$rows</tbody>
</table>
"""
)
_TRACE_ROW = Template(
    "<tr><td>$service</td>"
    '<td><a href="$href">$method <span class="mono">$route</span></a>'
    '<br><span class="mono muted">$span_id</span></td>'
    '<td class="num">$status</td>'
    '<td class="num">+$offset</td>'
    '<td class="num">$duration</td>'
    "$kept"
    '<td class="chart"><div class="wf" title="$tip"><div class="bar" '
    'style="left:$left%;width:$width%"></div></div></td>'
    '<td class="muted">$extra</td></tr>\n'
)


def trace_page(prefix: str, trace_id: str, fmt: str, summaries: Sequence[ProfileSummary]) -> str:
    """Every profiled span of one trace, in start order, as a waterfall."""
    ordered = sorted(summaries, key=lambda s: (s.start_time, s.span_id))
    first = ordered[0].start_time
    end = max(s.start_time + s.duration_ms / 1000.0 for s in ordered)
    whole_ms = max((end - first) * 1000.0, 0.001)
    rows = []
    for s in ordered:
        offset_ms = (s.start_time - first) * 1000.0
        left = min(offset_ms / whole_ms * 100.0, 99.7)
        width = max(min(s.duration_ms / whole_ms * 100.0, 100.0 - left), 0.3)
        extra = [link(flame_path(prefix, s), "flame graph alone")] if fmt == "html" else []
        if s.route:
            extra.append(link(diff_path(prefix, s), "vs route"))
        rows.append(
            fill(
                _TRACE_ROW,
                service=s.service or _NO_SERVICE,
                href=profile_path(prefix, s, fmt),
                method=s.method,
                route=s.route or _NO_ROUTE,
                span_id=s.span_id,
                status=s.status_code,
                offset=f"{offset_ms:.1f}",
                duration=f"{s.duration_ms:.1f}",
                kept=kept_cell(s),
                tip=f"{s.method} {s.route or _NO_ROUTE}: starts at +{offset_ms:.1f} ms, "
                f"takes {s.duration_ms:.1f} ms",
                left=f"{left:.3f}",
                width=f"{width:.3f}",
                extra=join(extra, " · "),
            )
        )
    services = sorted({s.service for s in ordered if s.service})
    where = (
        f"from {plural(len(services), 'service')} ({', '.join(services)})"
        if services
        else "(services not recorded)"
    )
    spans = plural(len(ordered), "profiled span")
    body = fill(_TRACE_BODY, spans=spans, where=where, whole=f"{whole_ms:.1f}", rows=join(rows))
    heading = fill(
        _TRACE_HEADING, home=link(prefix, "otelprof: all profiles"), crumb=CRUMB, trace_id=trace_id
    )
    return page(f"Trace {trace_id[:8]}… · {spans} · otelprof", body, heading=heading)


_DIFF_HEADING = Template(
    """<nav class="crumbs">$home$crumb$trace$crumb$request${crumb}vs its route</nav>
<h1>$method <span class="mono">$route</span> $duration ms against its route</h1>
"""
)
_DIFF_INTRO = Template(
    """<p>Request <a class="mono" href="$href">$trace_id</a> ($method \
<span class="mono">$route</span>, $duration ms) against the mean of the \
<a href="$baseline">$others of its route</a> taken by the same profiler ($mode). Times are \
inclusive: the time each function was on the stack, waits included.</p>
"""
)
_ALONE = Template(
    """<p class="muted">No other kept profile of its route was taken by the same profiler \
($mode) so far: there is nothing to compare it with yet. Come back when the route has \
more.</p>
"""
)
# The profilers, as the profile page names them: a diff compares one profiler's profiles.
_PROFILERS = {"hook": "pyinstrument hook", "always_on": "always-on sampler"}
_GRAPH = Template(
    """<h2>Flame graph</h2>
<p class="legend muted">This request's call paths, as wide as the time they took here, \
coloured by the route's mean: <span style="background:#e57373">took longer</span>\
<span style="background:#7fa8cc">took less</span>\
<span style="background:#e8e8e8">about the same</span> (by at least 2% of the request). \
Hover a frame for its self and total time here and usually. Paths the route usually runs \
and this request did not are in the tables only.</p>
$flame"""
)
_NO_SAMPLES = Markup('<p class="muted">No samples in this request: nothing to draw.</p>\n')
_FUNCTIONS = Template("<h2>Functions</h2>\n$more$less")
_TABLE = Template(
    """<h3>$title</h3>
<table>
<thead><tr><th>Function</th><th>Where</th><th>This request (ms)</th>\
<th>Route mean (ms)</th><th>Difference (ms)</th><th>Share here</th>\
<th>Share usually</th></tr></thead>
<tbody>
$rows</tbody>
</table>
"""
)
_NONE = Template('<h3>$title</h3>\n<p class="muted">None.</p>\n')
_DIFF_ROW = Template(
    '<tr><td class="mono">$function</td>'
    '<td class="mono muted">$filename:$line</td>'
    '<td class="num">$request</td>'
    '<td class="num">$baseline</td>'
    '<td class="num">$delta</td>'
    '<td class="num">$share_here</td>'
    '<td class="num">$share_usually</td></tr>\n'
)
_TABLE_ROWS = 30


def diff_page(
    prefix: str,
    summary: ProfileSummary,
    baseline_count: int,
    rows: Sequence[DiffRow],
    flame: str = "",
) -> str:
    """One request against its route's ``baseline_count`` other profiles: the ``flame``
    graph (markup) and the functions that took more, then less, time than usual."""
    s = summary
    here = profile_path(prefix, s)
    heading = fill(
        _DIFF_HEADING,
        home=link(prefix, "otelprof: all profiles"),
        crumb=CRUMB,
        trace=trace_crumb(prefix, s.trace_id),
        request=link(here, "this request"),
        method=s.method,
        route=s.route,
        duration=f"{s.duration_ms:.1f}",
    )
    intro = fill(
        _DIFF_INTRO,
        href=here,
        trace_id=s.trace_id,
        method=s.method,
        route=s.route,
        duration=f"{s.duration_ms:.1f}",
        baseline=baseline_path(prefix, s.route),
        others=plural(baseline_count, "other recent profile"),
        mode=_PROFILERS.get(s.mode, s.mode),
    )
    title = f"{s.method} {s.route or _NO_ROUTE} {ms_text(s.duration_ms)} vs route · otelprof"
    if baseline_count == 0:
        alone = fill(_ALONE, mode=_PROFILERS.get(s.mode, s.mode))
        return page(title, intro + alone, heading=heading)
    graph = fill(_GRAPH, flame=Markup(flame)) if flame else _NO_SAMPLES
    functions = fill(
        _FUNCTIONS,
        more=_table("Took more time than usual", [r for r in rows if r.delta_ms > 0]),
        less=_table("Took less time", [r for r in rows if r.delta_ms < 0]),
    )
    return page(title, intro + graph + functions, heading=heading)


def _table(title: str, rows: Sequence[DiffRow]) -> Markup:
    if not rows:
        return fill(_NONE, title=title)
    body = join(
        [
            fill(
                _DIFF_ROW,
                function=row.function,
                filename=row.filename,
                line=row.line,
                request=f"{row.request_ms:.1f}",
                baseline=f"{row.baseline_ms:.1f}",
                delta=f"{row.delta_ms:+.1f}",
                share_here=f"{row.request_share:.0%}",
                share_usually=f"{row.baseline_share:.0%}",
            )
            for row in rows[:_TABLE_ROWS]
        ]
    )
    return fill(_TABLE, title=title, rows=body)
