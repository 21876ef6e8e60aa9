"""The viewer's pages in a real headless Chromium, served by real uvicorn processes.

Two services (``tests/e2e/trace_apps.py``) share one real redis-server as their store:
``checkout`` calls ``pricing`` inside one trace. Debian's Chromium, driven by Playwright
with the system executable, opens the page a span link points at (the profile frame),
the trace page, the diff, the route baseline and the index. On every page: no console
error (pyinstrument's page in the frame included), no uncaught exception, no request to
any host but 127.0.0.1, and every link and frame on it answers 200. The profile frame's
tab title names the request and its header shows the trace id; the trace page lists
both services' spans in start order and one click opens a span's profile; the diff
draws the slow marker function as slower.

Skipped, with the reason, when Playwright or Chromium is missing (``.ci/run`` installs
both). Screenshots go to ``test-artifacts/`` (and to ``docs/images/`` with
``DOCS_SCREENSHOTS=1``: ``DOCS_SCREENSHOTS=1 .venv/bin/python -m pytest
tests/e2e/test_viewer_browser.py``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.redis_server import RedisServer

from ..chromium import launched_chromium
from ..helpers import free_port
from .servers import ROOT, Server, run_server, uvicorn

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

PREFIX = "/debug/profile"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
ARTIFACTS = ROOT / "test-artifacts"
DOCS_IMAGES = ROOT / "docs" / "images"


@dataclass
class Demo:
    checkout: Server
    pricing: Server
    rows: list[dict[str, Any]]  # index JSON rows of TRACE, in start order


@dataclass
class Seen:
    """What Chromium saw while one page (and its frames) loaded."""

    url: str
    title: str = ""
    text: str = ""
    links: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def assert_clean(self) -> None:
        assert self.console_errors == [], (self.url, self.console_errors)
        assert self.page_errors == [], (self.url, self.page_errors)
        elsewhere = [
            u
            for u in self.requests
            if not u.startswith("data:") and urlsplit(u).hostname != "127.0.0.1"
        ]
        assert elsewhere == [], (self.url, elsewhere)
        assert self.requests, "the page itself was requested"
        for link in self.links:  # every link and frame of the page answers
            assert httpx.get(link, timeout=10).status_code == 200, (self.url, link)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    yield from launched_chromium()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    tmp = tmp_path_factory.mktemp("viewer-browser")
    redis_server = RedisServer(tmp / "redis")
    redis_server.start()
    port_checkout, port_pricing = free_port(), free_port()
    env = {"OTELPROF_STORE": redis_server.url + "/0?prefix=viewer-browser:"}
    for name in ("checkout", "pricing"):
        (tmp / name).mkdir()
    try:
        with ExitStack() as stack:
            pricing = stack.enter_context(
                run_server(
                    uvicorn("tests.e2e.trace_apps:app", port_pricing, workers=1),
                    tmp / "pricing",
                    env={**env, "TRACE_APPS_SERVICE": "pricing"},
                    port=port_pricing,
                )
            )
            checkout = stack.enter_context(
                run_server(
                    uvicorn("tests.e2e.trace_apps:app", port_checkout, workers=1),
                    tmp / "checkout",
                    env={
                        **env,
                        "TRACE_APPS_SERVICE": "checkout",
                        "TRACE_APPS_PRICING_URL": pricing.base_url,
                    },
                    port=port_checkout,
                )
            )
            for n in range(3):  # the route's usual requests, each its own trace
                assert httpx.get(f"{checkout.base_url}/checkout/{n}", timeout=10).text == "total 42"
            traceparent = f"00-{TRACE}-{'1' * 16}-01"
            answer = httpx.get(
                f"{checkout.base_url}/checkout/9?slow=1",
                headers={"traceparent": traceparent},
                timeout=10,
            )
            assert answer.text == "total 42"
            yield Demo(checkout, pricing, _trace_rows(checkout, expect=2))
    finally:
        redis_server.stop()


def _trace_rows(server: Server, expect: int, timeout: float = 15.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        rows = httpx.get(
            server.base_url + PREFIX, params={"format": "json", "limit": 1000}, timeout=10
        ).json()["profiles"]
        mine = [r for r in rows if r["trace_id"] == TRACE]
        if len(mine) >= expect or time.monotonic() > deadline:
            assert len(mine) == expect, rows
            return sorted(mine, key=lambda r: r["start_time"])
        time.sleep(0.1)


def _visit(browser: Browser, url: str, shot: str | None = None, *, then: Any = None) -> Seen:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page: Page = context.new_page()
    seen = Seen(url)
    page.on("console", lambda m: seen.console_errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda error: seen.page_errors.append(str(error)))
    page.on("request", lambda request: seen.requests.append(request.url))
    try:
        response = page.goto(url, wait_until="load")
        assert response is not None and response.status == 200, url
        if page.locator("iframe").count():  # pyinstrument's page: wait until it drew
            inner = page.frames[1]
            deadline = time.monotonic() + 10
            while not inner.evaluate("document.querySelector('#app')?.childElementCount > 0"):
                assert time.monotonic() < deadline, "pyinstrument's app did not draw"
                page.wait_for_timeout(50)
        page.wait_for_timeout(200)
        seen.title = page.title()
        seen.text = page.inner_text("body")
        seen.links = page.eval_on_selector_all(
            "a[href], iframe[src]", "els => els.map(e => e.href || e.src)"
        )
        if shot:
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / shot), full_page=False)
            if os.environ.get("DOCS_SCREENSHOTS") == "1":
                DOCS_IMAGES.mkdir(exist_ok=True)
                page.screenshot(path=str(DOCS_IMAGES / shot), full_page=False)
        if then is not None:
            then(page, seen)
    finally:
        context.close()
    return seen


def test_the_span_link_opens_a_framed_profile(browser: Browser, demo: Demo) -> None:
    checkout = demo.rows[0]
    assert (checkout["route"], checkout["service"]) == ("/checkout/{n}", "checkout")
    seen = _visit(browser, checkout["url"], "viewer-profile.png")
    seen.assert_clean()
    assert seen.title.startswith("GET /checkout/{n} ") and seen.title.endswith(" ms · otelprof")
    for fact in (TRACE, checkout["span_id"], "checkout", "/checkout/{n}", "200"):
        assert fact in seen.text, fact
    base = demo.checkout.base_url + PREFIX
    span = checkout["span_id"]
    for expected in (
        f"{base}/{TRACE}/diff?span_id={span}",
        f"{base}/route?route=%2Fcheckout%2F%7Bn%7D",
        f"{base}/{TRACE}",
        base,
        f"{base}/{TRACE}/flame?span_id={span}",
        f"{base}/{TRACE}?span_id={span}&format=speedscope",
    ):
        assert expected in seen.links, expected


def test_the_trace_page_shows_both_services_in_start_order(browser: Browser, demo: Demo) -> None:
    pricing = demo.rows[1]
    assert pricing["service"] == "pricing" and pricing["route"] == "/price/{n}"

    def click_pricing(page: Page, seen: Seen) -> None:
        cells = page.eval_on_selector_all(
            "tbody tr td:first-child", "tds => tds.map(t => t.innerText)"
        )
        assert cells == ["checkout", "pricing"], cells
        page.get_by_role("link", name="GET /price/{n}").click()  # one click to its profile
        page.wait_for_load_state("load")
        # (a relative link: on the host that served the trace page)
        assert page.url.endswith(urlsplit(pricing["url"]).path + f"?span_id={pricing['span_id']}")
        assert page.title().startswith("GET /price/{n} ")

    # The trace page answers on either service: the store is shared.
    for server in (demo.checkout, demo.pricing):
        url = f"{server.base_url}{PREFIX}/{TRACE}"
        shot = "viewer-trace.png" if server is demo.checkout else None
        seen = _visit(browser, url, shot, then=click_pricing if server is demo.pricing else None)
        seen.assert_clean()
        assert "2 profiled spans of this trace" in seen.text and "2 services" in seen.text
        assert seen.title == f"Trace {TRACE[:8]}… · 2 profiled spans · otelprof"


def test_the_diff_draws_the_slow_marker_slower(browser: Browser, demo: Demo) -> None:
    checkout = demo.rows[0]
    url = f"{demo.checkout.base_url}{PREFIX}/{TRACE}/diff?span_id={checkout['span_id']}"

    def slower(page: Page, seen: Seen) -> None:
        marked = page.locator('g.frame.slower[data-function="checkout_marker"]')
        assert marked.count() >= 1
        tip = marked.first.locator("title").text_content() or ""
        assert "this request: total" in tip and "route mean: total" in tip

    seen = _visit(browser, url, "viewer-diff.png", then=slower)
    seen.assert_clean()
    assert "Took more time than usual" in seen.text and "3 other recent profiles" in seen.text


def test_the_index_and_the_baseline(browser: Browser, demo: Demo) -> None:
    index = _visit(browser, demo.checkout.base_url + PREFIX, "viewer-index.png")
    index.assert_clean()
    assert "/checkout/{n}" in index.text and "/price/{n}" in index.text
    baseline = _visit(
        browser,
        f"{demo.checkout.base_url}{PREFIX}/route?route=%2Fcheckout%2F%7Bn%7D",
        "viewer-baseline.png",
    )
    baseline.assert_clean()
    assert baseline.title == "Baseline /checkout/{n} · 4 requests · otelprof"
