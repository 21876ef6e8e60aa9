"""The index page: the filter form, per-route duration histograms, the recent profiles."""

from __future__ import annotations

from collections.abc import Sequence
from string import Template

from .._record import ProfileSummary
from .._time import utc
from . import _svg
from ._format import plural
from ._html import (
    Markup,
    baseline_path,
    diff_path,
    fill,
    join,
    kept_cell,
    link,
    page,
    profile_path,
)
from ._query import MAX_LIMIT, ORDERS, Filters

__all__ = ["index_page"]

_TITLE = "Recent profiles · otelprof"

_FORM = Template(
    """<form method="get" action="$prefix">
<label>Route <input name="route" value="$route" placeholder="/items/{item_id}"></label>
<label>Min duration (ms) <input name="min_duration_ms" value="$min_ms" \
inputmode="decimal" size="8"></label>
<label>Order <select name="order">$orders</select></label>
<label>Limit <input name="limit" value="$limit" inputmode="numeric" size="5"></label>
<button type="submit">Filter</button>
<a href="$prefix">clear</a>
<a href="$json">JSON</a>
</form>
"""
)
_ORDER = Template('<option value="$order"$selected>$order first</option>')

_NOTHING_MATCHES = Markup("No profiles match these filters.")
_NO_PROFILES_YET = Markup(
    "No profiles yet. A profile appears here a moment after a profiled "
    "request finishes: requests are profiled by trace at "
    "<code>sample_rate</code> (<code>OTELPROF_SAMPLE_RATE</code>) or when "
    "asked for with the trigger header (<code>OTELPROF_TRIGGER_HEADER</code>, "
    "default <code>x-otelprof</code>; its value must be the debug token when "
    "one is set), and kept when they took at least "
    "<code>min_duration_ms</code> (<code>OTELPROF_MIN_DURATION_MS</code>). "
    "Each kept profile is also linked from its request's server span."
)
_NOTE = Template('<p class="note">$note</p>\n')

_TABLE = Template(
    """<p class="muted">$count, $order_note. Times are UTC.</p>
<table>
<thead><tr><th>Time (UTC)</th><th>Method</th><th>Route</th><th>Status</th>\
<th>Duration (ms)</th><th>Kept</th><th>Trace id</th><th>Other formats</th></tr></thead>
<tbody>
$rows</tbody>
</table>
"""
)
_ROW = Template(
    '<tr><td class="mono"><a href="$link">$time</a></td>'
    "<td>$method</td>"
    '<td class="mono">$route</td>'
    '<td class="num">$status</td>'
    '<td class="num">$duration</td>'
    "$kept"
    '<td class="mono"><a href="$link">$trace_id</a></td>'
    '<td class="muted">$others</td></tr>\n'
)

_ROUTES = Template(
    """<h2>Routes</h2>
<p class="muted">Durations of $count, per route (log scale from $low to \
$high ms; red: slower than the route's 95th percentile).</p>
<table>
<thead><tr><th>Method</th><th>Route</th><th>Profiles</th><th>Median (ms)</th>\
<th>p95 (ms)</th><th>Slowest (ms)</th><th>Distribution</th><th></th></tr></thead>
<tbody>
$rows</tbody>
</table>
<h2>Profiles</h2>
"""
)
_ROUTE_ROW = Template(
    "<tr><td>$method</td>"
    '<td class="mono">$route</td>'
    '<td class="num">$count</td>'
    '<td class="num">$median</td>'
    '<td class="num">$p95</td>'
    '<td class="num">$slowest</td>'
    '<td class="chart">$chart</td>'
    '<td class="muted">$baseline</td></tr>\n'
)
_MAX_ROUTES = 30
_MORE_ROUTES = Template(
    '<tr><td></td><td colspan="7" class="muted">and $more with fewer profiles, not shown: '
    "filter by route to see one</td></tr>\n"
)
_NO_ROUTE = Markup('<span class="muted">(no route matched)</span>')
_OTHER_FORMATS = ("text", "speedscope", "json")


def index_page(
    prefix: str,
    filters: Filters,
    summaries: Sequence[ProfileSummary],
    distribution: Sequence[ProfileSummary] = (),
) -> str:
    """The index: ``summaries`` as rows; histograms of ``distribution`` (default: the rows)."""
    form = _form(prefix, filters)
    if not summaries:
        note = _NOTHING_MATCHES if filters.active else _NO_PROFILES_YET
        return page(_TITLE, form + fill(_NOTE, note=note))
    rows = join([_row(prefix, filters, s) for s in summaries])
    table = fill(
        _TABLE,
        count=plural(len(summaries), "profile"),
        order_note="newest first" if filters.order == "newest" else "slowest first",
        rows=rows,
    )
    routes = _routes_section(prefix, filters, distribution or summaries)
    return page(_TITLE, form + routes + table)


def _form(prefix: str, filters: Filters) -> Markup:
    orders = join(
        [
            fill(_ORDER, order=o, selected=Markup(" selected" if o == filters.order else ""))
            for o in ORDERS
        ]
    )
    return fill(
        _FORM,
        prefix=prefix,
        route=filters.route or "",
        min_ms="" if filters.min_duration_ms is None else f"{filters.min_duration_ms:g}",
        orders=orders,
        limit=filters.limit,
        json=prefix + "?" + filters.query(format="json"),
    )


def _row(prefix: str, filters: Filters, s: ProfileSummary) -> Markup:
    others = join([link(profile_path(prefix, s, fmt), fmt) for fmt in _OTHER_FORMATS], " ")
    if s.route:
        compare = [
            link(diff_path(prefix, s), "vs route", "this request vs its route"),
            link(baseline_path(prefix, s.route), "baseline", "recent combined"),
        ]
        others += Markup(" · ") + join(compare, " ")
    return fill(
        _ROW,
        link=profile_path(prefix, s),
        time=utc(s.start_time),
        method=s.method,
        route=(
            link(prefix + "?" + filters.query(route=s.route), s.route, "only this route")
            if s.route
            else _NO_ROUTE
        ),
        status=s.status_code,
        duration=f"{s.duration_ms:.1f}",
        kept=kept_cell(s),
        trace_id=s.trace_id,
        others=others,
    )


def _routes_section(prefix: str, filters: Filters, summaries: Sequence[ProfileSummary]) -> Markup:
    """Per route: how many stored profiles, their median, 95th percentile and slowest, and
    a histogram of their durations (one log scale for every route, so they compare)."""
    by_route: dict[tuple[str, str], list[float]] = {}
    for s in summaries:
        by_route.setdefault((s.route, s.method), []).append(s.duration_ms)
    if not by_route:
        return Markup()
    every = [d for durations in by_route.values() for d in durations]
    low, high = max(min(every), 0.1), max(every)
    ordered = sorted(by_route.items(), key=lambda item: (-len(item[1]), item[0]))
    rows = []
    for (route, method), durations in ordered[:_MAX_ROUTES]:
        durations.sort()
        # An unmatched request has no route to filter by (an empty route= is no filter).
        only = (
            link(
                prefix + "?" + filters.query(route=route, order="slowest"),
                route,
                "this route's profiles, slowest first",
            )
            if route
            else _NO_ROUTE
        )
        rows.append(
            fill(
                _ROUTE_ROW,
                method=method,
                route=only,
                count=len(durations),
                median=f"{_svg.percentile(durations, 50):.1f}",
                p95=f"{_svg.percentile(durations, 95):.1f}",
                slowest=f"{durations[-1]:.1f}",
                chart=Markup(_svg.duration_histogram(durations, low, high)),
                baseline=link(baseline_path(prefix, route), "baseline") if route else "",
            )
        )
    if len(ordered) > _MAX_ROUTES:
        hidden = len(ordered) - _MAX_ROUTES
        rows.append(fill(_MORE_ROUTES, more=plural(hidden, "more route")))
    count = plural(len(every), "stored profile")
    if len(every) >= MAX_LIMIT:
        # The store may hold more than the table reads: the counts are not the store's.
        count = f"the newest {count} (the most this table reads; filter by route for one route's)"
    return fill(_ROUTES, count=count, low=f"{low:.1f}", high=f"{high:.1f}", rows=join(rows))
