"""viewer/_html.py: templates escape every value unless it is markup built from escaped parts."""

from __future__ import annotations

from string import Template

from otelprof_middleware.viewer._html import Markup, fill, join, link

EVIL = "<script>alert('x')</script>&\""
ESCAPED = "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;&quot;"


def test_plain_values_are_escaped_markup_is_not() -> None:
    page = fill(
        Template('<p title="$title">$body $raw</p>'), title=EVIL, body=EVIL, raw=Markup("<b>ok</b>")
    )
    assert page == f'<p title="{ESCAPED}">{ESCAPED} <b>ok</b></p>'
    assert isinstance(page, Markup)


def test_numbers_and_none_are_text() -> None:
    assert fill(Template("$a|$b|$c"), a=3, b=1.5, c=None) == "3|1.5|None"


def test_markup_stays_markup_only_with_markup() -> None:
    """Adding plain text to markup gives plain text, so it is escaped when filled."""
    bold = Markup("<b>x</b>")
    assert isinstance(bold + Markup("<i>y</i>"), Markup)
    assert not isinstance(bold + EVIL, Markup)
    assert fill(Template("$v"), v=bold + EVIL) == "&lt;b&gt;x&lt;/b&gt;" + ESCAPED
    assert fill(Template("$v"), v=join([bold, link("/a?b=1&c=2", EVIL, EVIL)], " · ")) == (
        f'<b>x</b> · <a href="/a?b=1&amp;c=2" title="{ESCAPED}">{ESCAPED}</a>'
    )
