"""Stored XSS, proven in headless Chromium: hostile routes, methods, target descriptions,
function and file names are shown as text on every viewer page, and nothing runs.

A real uvicorn serves ``tests/security/xss_app.py`` (a store pre-filled with real
pyinstrument profiles of functions named after payloads, plus a live route whose template
is made of payloads). Debian's Chromium, driven by Playwright with the system
executable, opens the index, the filtered index, the trace page, every profile page and
the text/json/folded formats. On each: no injected element, ``window.__xss`` unset, no
console error and no uncaught exception, the payloads readable as text.

pyinstrument's page script links a Google Fonts stylesheet; the viewer blanks that URL
(render.py), so no page asks a third party for anything and no console error is allowed.
A profile's HTML page is our frame (facts, links) around pyinstrument's page in an
``<iframe>``; both are visited.

Skipped, with the reason, when Playwright or Chromium is missing; ``.ci/run`` installs
both. Screenshots go to ``test-artifacts/``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx
import pytest

from ..chromium import launched_chromium
from ..e2e.servers import Server, run_server, uvicorn
from ..helpers import free_port
from ._support import ARTIFACTS, HOSTILE_ROUTE, LIVE_FUNCTION, PAYLOADS, STORED, TALLY

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Page, Request

pytestmark = pytest.mark.browser

PREFIX = "/debug/profile"
# The deliberate block of pyinstrument's Google Fonts stylesheet (see the module doc).
FONT_BLOCKED = re.compile(
    r"stylesheet 'https://fonts\.googleapis\.com/[^']*'.*Content Security Policy", re.DOTALL
)
FONTS = "https://fonts.googleapis.com/"
# Anything a payload would add to the DOM if it were parsed as markup (pyinstrument's
# own page draws icons with <svg>, never with handler attributes).
# The frame's own <iframe> (pyinstrument's page, from the viewer) is counted apart.
INJECTED = "img[src='x'], [onerror], [onload], iframe[srcdoc], object, embed"


@dataclass
class Visit:
    """What Chromium saw on one page."""

    url: str
    status: int
    text: str
    xss: Any
    injected: int
    scripts: int
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    external_requests: list[str] = field(default_factory=list)
    blocked_by_csp: list[str] = field(default_factory=list)
    drawn: bool | None = None  # pyinstrument's app drew the profile (None: not its page)
    iframes: list[str] = field(default_factory=list)  # src of every <iframe>

    def assert_clean(self, *, scripts: int, fonts_blocked: bool = False) -> None:
        assert self.status == 200, self.url
        assert self.xss is None, f"injected script ran on {self.url}"
        assert self.injected == 0, f"{self.injected} injected elements on {self.url}"
        assert self.scripts == scripts, f"{self.scripts} <script> elements on {self.url}"
        # At most the viewer's own frame of pyinstrument's page, from the viewer's origin.
        assert len(self.iframes) <= 1, self.iframes
        assert all(src.startswith(PREFIX + "/") and "/flame?" in src for src in self.iframes)
        assert self.page_errors == [], self.page_errors
        assert self.drawn is not False, f"pyinstrument's app did not draw {self.url}"
        unexpected = [
            e for e in self.console_errors if not (fonts_blocked and FONT_BLOCKED.search(e))
        ]
        assert unexpected == [], unexpected
        # Nothing leaves the origin; the font stylesheet is stopped by the CSP, not the network.
        escaped = [
            url
            for url in self.external_requests
            if not (fonts_blocked and url.startswith(FONTS) and url in self.blocked_by_csp)
        ]
        assert escaped == [], escaped


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    yield from launched_chromium()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port()
    tmp = tmp_path_factory.mktemp("xss")
    with run_server(uvicorn("tests.security.xss_app:app", port, workers=1), tmp, port=port) as s:
        live = s.base_url + quote(HOSTILE_ROUTE.replace("{item}", "7"))
        assert httpx.get(live, timeout=10).status_code == 200
        TALLY["requests sent"] += 1
        _index_rows(s, expect=len(STORED) + 1)
        yield s


def _index_rows(server: Server, expect: int = 0, timeout: float = 10.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        rows: list[dict[str, Any]] = httpx.get(
            server.base_url + PREFIX + "?format=json", timeout=10
        ).json()["profiles"]
        TALLY["requests sent"] += 1
        if len(rows) >= expect or time.monotonic() > deadline:
            assert len(rows) >= expect
            return rows
        time.sleep(0.1)


def _poll(page: Page, condition: str, timeout: float = 5.0) -> bool:
    """Poll ``condition`` from the driver (``wait_for_function`` evaluates it with ``eval``
    inside the page, which the viewer's CSP rightly forbids)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(condition):
        if time.monotonic() > deadline:
            return False
        page.wait_for_timeout(50)
    return True


def visit(browser: Browser, url: str, *, screenshot: str | None = None) -> Visit:
    context = browser.new_context()
    page: Page = context.new_page()
    seen = Visit(url, 0, "", None, 0, 0)
    origin = url.split("/debug/", 1)[0]

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            seen.console_errors.append(message.text)

    page.on("console", on_console)
    page.on("pageerror", lambda error: seen.page_errors.append(str(error)))

    def on_request(request: Request) -> None:
        if not request.url.startswith((origin, "data:")):
            seen.external_requests.append(request.url)

    def on_failed(request: Request) -> None:
        if request.failure == "csp":
            seen.blocked_by_csp.append(request.url)

    page.on("request", on_request)
    page.on("requestfailed", on_failed)
    try:
        response = page.goto(url, wait_until="load")
        assert response is not None
        seen.status = response.status
        if page.locator("#app").count():  # pyinstrument's page: wait for its app to draw
            seen.drawn = _poll(page, "document.querySelector('#app').childElementCount > 0")
        page.wait_for_timeout(200)  # let any onerror/onload handler fire
        seen.text = page.inner_text("body")
        seen.xss = page.evaluate("window.__xss")
        seen.injected = page.locator(INJECTED).count()
        seen.scripts = page.locator("script").count()
        seen.iframes = page.eval_on_selector_all(
            "iframe", "frames => frames.map(f => f.getAttribute('src') || '')"
        )
        if screenshot:
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / screenshot), full_page=True)
    finally:
        context.close()
    TALLY["browser pages"] += 1
    return seen


def test_the_index_shows_hostile_routes_as_text(browser: Browser, server: Server) -> None:
    page = visit(browser, server.base_url + PREFIX, screenshot="security-index.png")
    page.assert_clean(scripts=0)
    for payload in PAYLOADS:
        assert payload in page.text, payload
    assert "/{item}" in page.text and HOSTILE_ROUTE.replace("/{item}", "") in page.text


def test_the_filter_form_shows_a_hostile_route_as_text(browser: Browser, server: Server) -> None:
    for payload in PAYLOADS:
        url = f"{server.base_url}{PREFIX}?route={quote(payload, safe='')}"
        page = visit(browser, url)
        page.assert_clean(scripts=0)
        assert payload in page.text


def test_the_trace_page_shows_hostile_routes_as_text(browser: Browser, server: Server) -> None:
    trace_id = STORED[3][0]
    page = visit(browser, f"{server.base_url}{PREFIX}/{trace_id}", screenshot="security-trace.png")
    page.assert_clean(scripts=0)
    assert "2 profiled spans of this trace" in page.text
    for route in (STORED[3][3], STORED[4][3]):
        assert route in page.text


def test_every_profile_page_shows_hostile_frames_as_text(browser: Browser, server: Server) -> None:
    rows = _index_rows(server)
    expected = {
        (trace_id, span_id): (name, description)
        for trace_id, span_id, _method, _route, name, _file, description in STORED
    }
    checked = 0
    for row in rows:
        live = row["route"] == HOSTILE_ROUTE
        shot = "security-profile.png" if live else None
        # The frame: the request's facts as text (its hostile route and method among them),
        # pyinstrument's page inside it; no script of its own.
        frame = visit(browser, row["url"], screenshot=shot)
        frame.assert_clean(scripts=0)
        assert row["route"] in frame.text and row["trace_id"] in frame.text
        flame = row["url"].replace("?span_id=", "/flame?span_id=")
        page = visit(browser, flame)
        # pyinstrument's page: its two inline scripts, allowed by hash; nothing external
        page.assert_clean(scripts=2)
        if live:
            name, description = LIVE_FUNCTION, HOSTILE_ROUTE
        else:
            name, description = expected[(row["trace_id"], row["span_id"])]
        assert name in page.text, (row["url"], name)
        assert description in page.text, (row["url"], description)
        assert "Samples:" in page.text, "pyinstrument's app drew the profile"
        checked += 1
    assert checked == len(STORED) + 1


@pytest.mark.parametrize("fmt", ["text", "json", "folded"])
def test_other_formats_run_nothing(browser: Browser, server: Server, fmt: str) -> None:
    trace_id, span_id = STORED[0][0], STORED[0][1]
    page = visit(browser, f"{server.base_url}{PREFIX}/{trace_id}?span_id={span_id}&format={fmt}")
    page.assert_clean(scripts=0)
    assert STORED[0][4] in page.text  # the hostile function name, as text


def test_route_baseline_and_diff_pages_show_hostile_names_as_text(
    browser: Browser, server: Server
) -> None:
    # PAYLOADS[0] is the route of two stored profiles (STORED[0] and STORED[4]): a baseline
    # of two, and a diff of one against the other.
    route = STORED[0][3]
    assert STORED[4][3] == route
    frame = visit(
        browser,
        f"{server.base_url}{PREFIX}/route?route={quote(route, safe='')}",
        screenshot="security-baseline.png",
    )
    frame.assert_clean(scripts=0)
    assert route in frame.text
    baseline = visit(
        browser, f"{server.base_url}{PREFIX}/route/flame?route={quote(route, safe='')}"
    )
    baseline.assert_clean(scripts=2)
    assert route in baseline.text and STORED[0][4] in baseline.text
    trace_id, span_id = STORED[0][0], STORED[0][1]
    diff = visit(
        browser,
        f"{server.base_url}{PREFIX}/{trace_id}/diff?span_id={span_id}",
        screenshot="security-diff.png",
    )
    diff.assert_clean(scripts=0)
    assert route in diff.text and STORED[0][4] in diff.text
