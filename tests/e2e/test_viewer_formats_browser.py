"""Every profile page and format in a real headless Chromium, for the profiles a user meets.

The FastAPI demo runs under a real uvicorn with a SQLite store; it keeps the profile of a
normal request (``/cpu``) and of a failed one (``/fail``, 500). Two more records go into
the same store beside them: a profile without a sample (an always-on profile of a request
shorter than one tick) and a corrupt one (its payload is not a session). Chromium opens
each one's framed page, pyinstrument's page alone (``.../flame``), every other format and
the diff, and reports what a user sees: the tab title, the text of each frame, console
errors.

Skipped, with the reason, when Playwright or Chromium is missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
import pytest

from otelprof_middleware._record import ProfileRecord
from otelprof_middleware.stores import SQLiteStore

from ..chromium import launched_chromium
from ..helpers import free_port, make_session, make_summary
from .servers import Server, run_server, uvicorn

if TYPE_CHECKING:
    from playwright.sync_api import Browser

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

PREFIX = "/debug/profile"
EMPTY = make_summary(
    trace_id="e" * 32, span_id="e" * 16, route="/empty", duration_ms=0.3, mode="always_on"
)
CORRUPT = make_summary(trace_id="c" * 32, span_id="c" * 16, route="/corrupt")


@dataclass
class Seen:
    """What Chromium showed for one URL: the tab title, each frame's text, console errors."""

    title: str
    frames: dict[str, str]
    console_errors: list[str]


@dataclass
class Profiles:
    server: Server
    links: dict[str, str]  # "cpu", "fail", "empty", "corrupt": the span link's path


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    yield from launched_chromium()


@pytest.fixture(scope="module")
def profiles(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Profiles]:
    tmp = tmp_path_factory.mktemp("viewer-formats")
    store_path = tmp / "profiles.db"
    port = free_port()
    env = {"OTELPROF_STORE": f"sqlite:///{store_path}"}
    with run_server(
        uvicorn("demo_app.fastapi_app:app", port, workers=1), tmp, env=env, port=port
    ) as server:
        assert httpx.get(server.base_url + "/cpu?ms=40", timeout=10).status_code == 200
        assert httpx.get(server.base_url + "/fail", timeout=10).status_code == 500
        store = SQLiteStore(store_path)
        try:
            empty = make_session(
                [],
                duration=0.0003,
                start_time=EMPTY.start_time,
                target_description="GET /empty · always-on sampler, interval 5 ms",
            )
            store.put(ProfileRecord.from_session(EMPTY, empty))
            store.put(ProfileRecord(summary=CORRUPT, payload=b"not a session" * 8))
        finally:
            store.close()
        rows = _rows(server, expect=4)
        yield Profiles(server, {row["route"].strip("/"): row["url"] for row in rows})


def _rows(server: Server, expect: int) -> list[dict[str, str]]:
    for _ in range(100):
        rows: list[dict[str, str]] = httpx.get(
            server.base_url + PREFIX, params={"format": "json"}, timeout=10
        ).json()["profiles"]
        if len(rows) >= expect:
            return rows
        httpx.get(server.base_url + PREFIX, timeout=10)  # a pause that is a request
    raise AssertionError(f"the store holds {rows}")


def _open(browser: Browser, url: str) -> Seen:
    page = browser.new_page()
    errors: list[str] = []
    page.on(
        "console", lambda message: errors.append(message.text) if message.type == "error" else None
    )
    try:
        page.goto(url, wait_until="load")
        page.wait_for_load_state("networkidle")
        frames = {}
        for frame in page.frames:
            frames[frame.url] = frame.inner_text("body") if frame.url != "about:blank" else ""
        return Seen(page.title(), frames, errors)
    finally:
        page.close()


def _flame(link: str) -> str:
    return link.replace("?span_id=", "/flame?span_id=")


@pytest.mark.parametrize("which", ["cpu", "fail", "empty"])
def test_every_format_of_a_profile_opens(browser: Browser, profiles: Profiles, which: str) -> None:
    link = profiles.links[which]
    framed = _open(browser, link)
    assert framed.console_errors == []
    assert [url for url in framed.frames if "/flame?" in url] == [_flame(link)]
    for fmt in ("text", "json", "speedscope", "folded"):
        answer = httpx.get(link + f"&format={fmt}", timeout=10)
        assert answer.status_code == 200, (which, fmt)
    diff = _open(browser, link.replace("?span_id=", "/diff?span_id="))
    assert diff.console_errors == []


def test_a_profile_that_cannot_be_shown_says_so_inside_its_frame(
    browser: Browser, profiles: Profiles
) -> None:
    """The frame page of a corrupt profile shows the viewer's 422 message in its frame.

    The error answer carried ``frame-ancestors 'none'`` and ``X-Frame-Options: DENY``,
    so Chromium replaced the frame with "127.0.0.1 refused to connect" and logged a CSP
    violation: the user saw the page's header above a broken frame and no reason.
    """
    link = profiles.links["corrupt"]
    seen = _open(browser, link)
    flame_text = seen.frames[_flame(link)]
    assert "the stored profile is corrupt and cannot be shown" in flame_text
    assert not [e for e in seen.console_errors if "frame-ancestors" in e]
    alone = httpx.get(_flame(link), timeout=10)
    assert alone.status_code == 422
    assert "sandbox" in alone.headers["content-security-policy"]


@pytest.mark.parametrize(
    ("which", "expect"), [("cpu", "GET /cpu"), ("fail", "GET /fail"), ("empty", "GET /empty")]
)
def test_pyinstrument_page_tab_title_names_the_request(
    browser: Browser, profiles: Profiles, which: str, expect: str
) -> None:
    """pyinstrument titles its page with the last word of the session's description:
    ``0.0412s - ms - pyinstrument`` for ``GET /cpu · always-on sampler, interval 5 ms``."""
    seen = _open(browser, _flame(profiles.links[which]))
    assert expect in seen.title
    assert seen.title.endswith(" - pyinstrument")


def test_the_route_baseline_page_title_names_the_route(
    browser: Browser, profiles: Profiles
) -> None:
    base = profiles.server.base_url + PREFIX
    seen = _open(browser, base + "/route/flame?route=/cpu")
    assert "/cpu: baseline of 1 recent request" in seen.title
