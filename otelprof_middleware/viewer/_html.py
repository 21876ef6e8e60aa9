"""The pages' building blocks: escaped-by-default templates, the page shell and styles,
links between the viewer's pages.

Every value put into a template with :func:`fill` is HTML-escaped unless it is
:class:`Markup` (built by :func:`fill` or :func:`link` themselves, from escaped parts),
so XSS safety lives here, in one place.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from string import Template
from typing import overload
from urllib.parse import quote, urlencode

from .._record import ProfileSummary

__all__ = [
    "CRUMB",
    "FRAME_STYLE",
    "Markup",
    "baseline_path",
    "diff_path",
    "e",
    "facts",
    "fill",
    "flame_path",
    "kept_cell",
    "link",
    "page",
    "profile_path",
    "request_name",
    "trace_crumb",
    "trace_path",
]


class Markup(str):
    """A string of trusted markup: :func:`fill` puts it in as is."""

    __slots__ = ()

    @overload
    def __add__(self, other: Markup) -> Markup: ...
    @overload
    def __add__(self, other: str) -> str: ...
    def __add__(self, other: str) -> str:
        """Markup when ``other`` is markup too; plain text (escaped when filled) otherwise."""
        joined = str.__add__(self, other)
        return Markup(joined) if isinstance(other, Markup) else joined


def e(value: object) -> str:
    """``value`` as text, HTML-escaped (quotes included)."""
    return html.escape(str(value), quote=True)


def fill(template: Template, /, **values: object) -> Markup:
    """``template`` with ``values``: escaped, except :class:`Markup`."""
    return Markup(
        template.substitute(
            {name: v if isinstance(v, Markup) else e(v) for name, v in values.items()}
        )
    )


def join(parts: Sequence[Markup], separator: str = "") -> Markup:
    """Markup ``parts`` joined by ``separator`` (itself markup: a constant)."""
    return Markup(separator.join(parts))


_LINK = Template('<a href="$href"$hint>$text</a>')
_HINT = Template(' title="$title"')


def link(href: str, text: str, title: str = "") -> Markup:
    """An ``<a>`` to ``href``, showing ``text``, with ``title`` as its tooltip if given."""
    hint = fill(_HINT, title=title) if title else Markup()
    return fill(_LINK, href=href, text=text, hint=hint)


CRUMB = Markup(" &rsaquo; ")

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #1d1d1f; }
h1 { font-size: 1.3rem; margin: 0 0 1rem; }
form { display: flex; flex-wrap: wrap; gap: .75rem; align-items: end; margin-bottom: 1rem; }
label { display: flex; flex-direction: column; font-size: .8rem; color: #555; }
input, select, button { font: inherit; padding: .2rem .4rem; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .3rem .6rem; border-bottom: 1px solid #e3e3e3; }
th { font-size: .8rem; color: #555; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: .85rem; }
.muted { color: #777; }
.note { background: #f6f6f6; padding: .8rem 1rem; border-radius: 4px; max-width: 48rem; }
a { color: #0b5cad; }
nav.crumbs { font-size: .85rem; margin-bottom: .4rem; }
dl.facts { display: flex; flex-wrap: wrap; gap: .2rem 1.4rem; margin: .4rem 0; }
dl.facts div { display: flex; flex-direction: column; }
dl.facts dt { font-size: .72rem; color: #666; text-transform: uppercase; }
dl.facts dd { margin: 0; }
p.links { margin: .4rem 0 0; font-size: .9rem; }
.status-error { color: #b00020; font-weight: 600; }
.wf { position: relative; min-width: 16rem; height: 14px; background: #f3f3f3; }
.wf .bar { position: absolute; top: 0; height: 14px; background: #6b8fb5; }
td.chart { padding: 0 .6rem; vertical-align: middle; }
svg.flamediff { display: block; max-width: 100%; margin: .5rem 0 1rem; }
svg.flamediff g.frame:hover rect { stroke: #000; stroke-width: .8; }
.legend span { display: inline-block; padding: 0 .4rem; margin-right: .4rem; }
"""

FRAME_STYLE = """
html, body { height: 100%; }
body { margin: 0; display: flex; flex-direction: column; }
header { padding: .8rem 1.2rem .6rem; border-bottom: 1px solid #ddd; background: #fafafa; }
header h1 { margin: 0; font-size: 1.15rem; }
iframe { flex: 1; width: 100%; border: 0; min-height: 24rem; }
"""
"""The frame around pyinstrument's page: a header, then the flame graph filling the window."""

_PAGE = Template(
    """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title</title>
<style>$style</style>
</head>
<body>
$heading$body</body>
</html>
"""
)
_H1 = Template("<h1>$title</h1>\n")


def page(title: str, body: Markup, *, heading: Markup | None = None, style: str = "") -> Markup:
    """A whole page: ``title`` in the browser tab, ``heading`` (default: the title, as
    text) as its ``<h1>``, then ``body``."""
    return fill(
        _PAGE,
        title=title,
        style=Markup(STYLE + style),
        heading=fill(_H1, title=title) if heading is None else heading,
        body=body,
    )


_FACT = Template("<div><dt>$label</dt><dd>$value</dd></div>")
_FACTS = Template('<dl class="facts">$items</dl>\n')


def facts(pairs: Sequence[tuple[str, str]]) -> Markup:
    """``(label, value)`` pairs as a definition list (values: text, or :class:`Markup`)."""
    items = join([fill(_FACT, label=label, value=value) for label, value in pairs])
    return fill(_FACTS, items=items)


def request_name(summary: ProfileSummary) -> str:
    """``GET /items/{item_id}``: the request's method and route, as text."""
    return f"{summary.method} {summary.route or '(no route matched)'}"


_KEPT = Template('<td class="kept">$reason</td>')
_KEPT_UNKNOWN = Markup(
    '<td class="kept muted" title="not recorded (stored by an older version)">—</td>'
)


def kept_cell(summary: ProfileSummary) -> Markup:
    """The "Kept" cell: why the profile was kept; a muted dash when the profile was
    stored by an older version, which did not record it."""
    if summary.kept_reason:
        return fill(_KEPT, reason=summary.kept_reason)
    return _KEPT_UNKNOWN


# where the pages are


def trace_path(prefix: str, trace_id: str) -> str:
    """The trace page."""
    return f"{prefix}/{quote(trace_id, safe='')}"


def profile_path(prefix: str, summary: ProfileSummary, fmt: str = "html") -> str:
    """One span's profile, as ``fmt``."""
    path = f"{trace_path(prefix, summary.trace_id)}?span_id={quote(summary.span_id, safe='')}"
    if fmt != "html":
        path += f"&format={quote(fmt, safe='')}"
    return path


def flame_path(prefix: str, summary: ProfileSummary) -> str:
    """pyinstrument's page of one span's profile (what the profile frame shows)."""
    return f"{trace_path(prefix, summary.trace_id)}/flame?" + urlencode(
        {"span_id": summary.span_id}
    )


def diff_path(prefix: str, summary: ProfileSummary) -> str:
    """One span against its route's baseline."""
    return f"{trace_path(prefix, summary.trace_id)}/diff?" + urlencode({"span_id": summary.span_id})


def baseline_path(
    prefix: str, route: str, *, flame: bool = False, extra: Mapping[str, str] | None = None
) -> str:
    """A route's baseline (``flame``: pyinstrument's page of it)."""
    return f"{prefix}/route{'/flame' if flame else ''}?" + urlencode(
        {"route": route, **(extra or {})}
    )


def trace_crumb(prefix: str, trace_id: str) -> Markup:
    """The breadcrumb to the trace page."""
    return link(trace_path(prefix, trace_id), f"trace {trace_id[:8]}…", "the trace page")
