"""render.py: every format from real pyinstrument sessions, empty sessions, HTML escaping."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pyinstrument.renderers.html
import pytest
from pyinstrument.session import Session

from otelprof_middleware._identifiers import identifier, line_attribute
from otelprof_middleware.render import (
    CONTENT_TYPES,
    FORMATS,
    RenderError,
    inline_script_hashes,
    render,
)

from .helpers import make_session, profile

EVIL = "</script><script>alert(1)</script>"
_DATA = re.compile(r"const sessionData = (.*);\s*pyinstrumentHTMLRenderer\.render\(", re.DOTALL)


def marker_render_work(rounds: int = 20_000) -> int:
    total = 0
    for _ in range(rounds):
        total += sum(range(50))
    return total


def evil_function() -> Callable[[int], int]:
    """A real function whose name and file name try to break out of a <script>."""
    source = (
        "def work(n):\n"
        "    t = 0\n"
        "    for _ in range(n):\n"
        "        t += sum(range(50))\n"
        "    return t\n"
    )
    namespace: dict[str, object] = {}
    exec(compile(source, f"/app/{EVIL}.py", "exec"), namespace)
    func = namespace["work"]
    assert isinstance(func, types.FunctionType)
    func.__code__ = func.__code__.replace(co_name=EVIL, co_qualname=EVIL)
    return cast("Callable[[int], int]", func)


@pytest.fixture(scope="module")
def session() -> Session:
    session = profile(marker_render_work)
    assert session.frame_records, "the work must have been sampled"
    return session


@pytest.fixture(scope="module")
def empty_session() -> Session:
    session = profile(lambda: None, interval=0.5)
    assert session.sample_count == 0 and not session.frame_records
    return session


@pytest.fixture(scope="module")
def evil_session() -> Session:
    work = evil_function()
    session = profile(lambda: work(20_000))
    session.target_description = EVIL
    assert any(EVIL in info for stack, _ in session.frame_records for info in stack)
    return session


def embedded_data(page: str) -> object:
    match = _DATA.search(page)
    assert match is not None, "pyinstrument's page layout changed"
    return json.loads(match.group(1))


# formats


def test_formats_and_content_types() -> None:
    assert FORMATS == ("html", "speedscope", "text", "json", "folded")
    assert set(CONTENT_TYPES) == set(FORMATS)
    assert all("charset=utf-8" in value for value in CONTENT_TYPES.values())


def test_unknown_format_raises(session: Session) -> None:
    with pytest.raises(ValueError, match="unknown format 'svg'"):
        render(session, "svg")


def test_html_is_pyinstruments_page(session: Session) -> None:
    body, content_type = render(session, "html")
    assert content_type == "text/html; charset=utf-8"
    assert body.lstrip().startswith("<!DOCTYPE html>")
    assert "pyinstrumentHTMLRenderer.render(" in body
    data = embedded_data(body)
    assert isinstance(data, dict)
    assert "marker_render_work" in json.dumps(data["frame_tree"])


def test_text_is_console_tree(session: Session) -> None:
    body, content_type = render(session, "text")
    assert content_type == "text/plain; charset=utf-8"
    assert "marker_render_work" in body
    assert "\x1b[" not in body, "no ANSI colours"


def test_speedscope_is_valid_file(session: Session) -> None:
    body, content_type = render(session, "speedscope")
    assert content_type == "application/json; charset=utf-8"
    data = json.loads(body)
    assert data["$schema"] == "https://www.speedscope.app/file-format-schema.json"
    names = {frame["name"] for frame in data["shared"]["frames"]}
    assert "marker_render_work" in names
    assert data["profiles"][0]["events"]


def test_json_is_frame_tree(session: Session) -> None:
    body, content_type = render(session, "json")
    assert content_type == "application/json; charset=utf-8"
    data = json.loads(body)
    assert data["sample_count"] == session.sample_count
    assert "marker_render_work" in json.dumps(data["root_frame"])


def test_folded_stacks(session: Session) -> None:
    body, content_type = render(session, "folded")
    assert content_type == "text/plain; charset=utf-8"
    lines = body.splitlines()
    assert lines
    for line in lines:
        stack, _, weight = line.rpartition(" ")
        assert stack and weight.isdigit() and int(weight) > 0, line
    assert len({line.rpartition(" ")[0] for line in lines}) == len(lines), "stacks merged"
    leafward = [line for line in lines if "marker_render_work (" in line]
    assert leafward
    frames = leafward[0].rpartition(" ")[0].split(";")
    assert any(frame.startswith("marker_render_work (") for frame in frames)
    assert "test_render.py:" in leafward[0]


def test_folded_weights_are_microseconds(session: Session) -> None:
    body, _ = render(session, "folded")
    total_us = sum(int(line.rpartition(" ")[2]) for line in body.splitlines())
    recorded_us = sum(seconds for _, seconds in session.frame_records) * 1_000_000
    assert abs(total_us - recorded_us) <= len(body.splitlines())


def test_folded_escapes_separators() -> None:
    session = make_session([(["a;b\x00/x;y.py\x001", "line\nbreak\x00/z.py\x002"], 0.002)])
    body, _ = render(session, "folded")
    assert body == "a:b (/x:y.py:1);line break (/z.py:2) 2000\n"


# empty sessions


def test_empty_session_text_says_why(empty_session: Session) -> None:
    body, _ = render(empty_session, "text")
    assert "No samples were taken: the request took" in body
    assert "shorter than the sampling interval (500.000 ms)" in body
    assert "No samples were recorded." not in body


def test_empty_session_longer_than_interval_is_not_blamed_on_it() -> None:
    session = make_session([], duration=0.25)
    body, _ = render(session, "text")
    assert "No samples were taken during the request's 250.000 ms" in body
    assert "shorter than" not in body


@pytest.mark.parametrize("fmt", ["html", "speedscope", "json", "folded"])
def test_empty_session_renders(empty_session: Session, fmt: str) -> None:
    body, _ = render(empty_session, fmt)
    if fmt == "html":
        data = embedded_data(body)
        assert isinstance(data, dict) and data["frame_tree"] is None
    elif fmt == "speedscope":
        assert json.loads(body)["profiles"][0]["events"] == []
    elif fmt == "json":
        assert json.loads(body)["root_frame"] is None
    else:
        assert body == ""


@pytest.mark.parametrize("fmt", FORMATS)
def test_session_without_start_call_stack_renders(session: Session, fmt: str) -> None:
    # Sessions assembled from frame records may lack a start stack; pyinstrument's
    # stem trimming raises IndexError on those.
    bare = Session.from_json({**session.to_json(), "start_call_stack": []})
    body, _ = render(bare, fmt)
    if fmt != "folded":
        assert "marker_render_work" in body
    assert bare.start_call_stack == [], "the caller's session is not modified"


# HTML safety


def test_html_escapes_script_breakout_in_frame_names(evil_session: Session) -> None:
    body, _ = render(evil_session, "html")
    assert EVIL not in body
    assert "<script>alert(1)" not in body
    assert len(re.findall("</script", body, re.IGNORECASE)) == 2, "only the template's scripts"
    assert "\\u003c/script\\u003e\\u003cscript\\u003ealert(1)" in body
    data = embedded_data(body)
    assert EVIL in json.dumps(data, ensure_ascii=False), "same data after escaping"
    assert isinstance(data, dict) and data["session"]["target_description"] == EVIL


def test_html_escapes_ampersand_and_line_separators() -> None:
    nasty = "a&b<!--c\u2028d\u2029e>"
    session = make_session([([f"{nasty}\x00/x.py\x001"], 0.01)], target_description=nasty)
    body, _ = render(session, "html")
    data_text = _DATA.search(body)
    assert data_text is not None
    for char in "&<>\u2028\u2029":
        assert char not in data_text.group(1)
    data = embedded_data(body)
    assert isinstance(data, dict) and data["session"]["target_description"] == nasty


def test_html_refuses_unexpected_layout(session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    def other_layout(self: object, session: Session) -> str:
        return "<html><script>var x = 1;</script></html>"

    monkeypatch.setattr(pyinstrument.renderers.html.HTMLRenderer, "render", other_layout)
    with pytest.raises(RenderError, match="unexpected layout"):
        render(session, "html")


def test_inline_script_hashes_cover_exactly_the_pages_scripts(session: Session) -> None:
    body, _ = render(session, "html")
    hashes = inline_script_hashes(body)
    assert len(hashes) == 2
    assert all(re.fullmatch(r"'sha256-[A-Za-z0-9+/]+={0,2}'", h) for h in hashes)
    app_js = (
        Path(pyinstrument.renderers.html.__file__).parent / "html_resources" / "app.js"
    ).read_text(encoding="utf-8")
    # pyinstrument's script, less its web-font URL (blanked: no third-party request),
    # its tab title made of the whole description.
    served_js = re.sub(r"https://fonts\.googleapis\.com/[^\"]*", "", app_js)
    assert served_js != app_js and "fonts.googleapis" not in served_js
    served_js = served_js.replace(r"/[^\s/]+(:\d+)?$/.exec(", "/.+/.exec(")
    app_hash = base64.b64encode(hashlib.sha256(served_js.encode("utf-8")).digest()).decode()
    assert hashes[0] == f"'sha256-{app_hash}'"
    other, _ = render(profile(lambda: marker_render_work(5_000)), "html")
    assert inline_script_hashes(other)[0] == hashes[0]
    assert inline_script_hashes(other)[1] != hashes[1], "the data script is hashed per page"


def test_html_names_no_font_host_but_keeps_the_programs_own_text(session: Session) -> None:
    # pyinstrument's script links a Google Fonts stylesheet: blanked, so the page asks
    # no third party for anything. A frame named after that host is data, left intact.
    body, _ = render(session, "html")
    assert "fonts.googleapis.com" not in body and "fonts.gstatic.com" not in body
    assert '.href=""' in body
    named = Session.from_json(
        {**session.to_json(), "target_description": "https://fonts.googleapis.com/css?x"}
    )
    page, _ = render(named, "html")
    assert page.count("fonts.googleapis.com") == 1, "only in the embedded profile data"
    assert page.index("fonts.googleapis.com") > page.index("const sessionData = ")


def test_html_titles_the_tab_with_the_whole_description(session: Session) -> None:
    # pyinstrument's script cut the description to its last word for the tab title
    # ("0.06s - ms - pyinstrument"); the browser test checks the title itself.
    body, _ = render(session, "html")
    head = body[: body.index("const sessionData = ")]
    assert r"/[^\s/]+(:\d+)?$/.exec(" not in head
    assert head.count("/.+/.exec(s.target_description)") == 1


def test_html_with_a_font_link_left_is_refused(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A future pyinstrument that names the font host some other way: refused, not served.
    real = pyinstrument.renderers.HTMLRenderer.render

    def with_other_font_url(self: object, s: Session) -> str:
        page: str = real(self, s)  # type: ignore[arg-type]
        return page.replace("<script>", "<script>const f='//fonts.gstatic.com/x';", 1)

    monkeypatch.setattr(pyinstrument.renderers.HTMLRenderer, "render", with_other_font_url)
    with pytest.raises(RenderError, match="web-font"):
        render(session, "html")


def _deep_session(depth: int) -> Session:
    """A recursion ``depth`` frames deep under a root, its leaf doing the work: what an
    app that raised ``sys.setrecursionlimit`` records (pyinstrument's renderers recurse
    once per frame, so such a tree overflowed the viewer's own recursion limit)."""
    root = identifier("handler", "/app/views.py", 1)
    level = identifier("walk", "/app/tree.py", 10) + line_attribute(12)
    leaf = identifier("leaf_work", "/app/tree.py", 20) + line_attribute(21)
    return make_session(
        [([root, *[level] * depth, leaf], 0.03), ([root, *[level] * (depth // 2)], 0.01)]
    )


@pytest.mark.parametrize("fmt", [fmt for fmt in FORMATS if fmt != "folded"])
def test_a_stack_deeper_than_the_recursion_limit_renders_with_the_middle_elided(
    fmt: str,
) -> None:
    depth = sys.getrecursionlimit() * 3
    body, _ = render(_deep_session(depth), fmt)
    # The root and the leaf stay, the frames between them are replaced by one frame
    # that says how many were left out.
    assert "handler" in body
    assert "leaf_work" in body
    assert re.search(r"\d+ frames elided", body), body[:2000]


def test_text_of_a_deep_stack_keeps_its_times() -> None:
    depth = sys.getrecursionlimit() * 3
    text, _ = render(_deep_session(depth), "text")
    assert "0.040 handler" in text
    assert "0.030 leaf_work" in text


def test_folded_keeps_every_frame_of_a_deep_stack() -> None:
    depth = sys.getrecursionlimit() * 3
    folded, _ = render(_deep_session(depth), "folded")
    deepest = max(folded.splitlines(), key=len)
    assert deepest.count("walk (/app/tree.py:10)") == depth
    assert "elided" not in folded
