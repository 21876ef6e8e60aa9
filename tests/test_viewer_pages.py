"""The viewer's pages through the real ASGI app: two services sharing one store serve
spans of one trace (W3C ``traceparent``), below a path prefix (``root_path``).

The profile frame names the request and links to every related page; the trace page
lists both services' spans in start order; the diff draws the slow marker as slower;
the index shows a duration histogram per route. Every link found on a page answers 200.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from otelprof_middleware import ProfilingMiddleware
from otelprof_middleware.stores import MemoryStore

from .helpers import marker_alpha, marker_beta

ROOT = "/svc"
VIEWER = ROOT + "/debug/profile"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
LOOPBACK = ("127.0.0.1", 50000)


def _items(request: Request) -> PlainTextResponse:
    # marker_alpha is the slow part of /items; the first requests spend little in it.
    marker_alpha(0.05 if request.query_params.get("slow") else 0.004)
    return PlainTextResponse("item")


def _price(request: Request) -> PlainTextResponse:
    marker_beta(0.004)
    return PlainTextResponse("price")


def _service(name: str, store: MemoryStore, route: Route) -> ProfilingMiddleware:
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    return ProfilingMiddleware(
        Starlette(routes=[route]),
        tracer_provider=provider,
        profile_store=store,
        sample_rate=1.0,
        min_duration_ms=0,
        debug_route=True,
    )


@pytest.fixture(scope="module")
def services() -> Iterator[tuple[httpx.Client, httpx.Client, MemoryStore]]:
    store = MemoryStore()
    front = _service("frontend", store, Route("/items/{n}", _items))
    back = _service("pricing", store, Route("/price/{n}", _price))
    # Starlette's TestClient runs the ASGI app for real; the viewer answers loopback only.
    clients = [
        TestClient(app, base_url="http://127.0.0.1:8000", root_path=ROOT, client=LOOPBACK)
        for app in (front, back)
    ]
    with clients[0] as a, clients[1] as b:
        for n in range(3):  # the route's usual requests, in other traces
            assert a.get(f"{ROOT}/items/{n}").text == "item"
        # One trace: the frontend's request, then the backend's, as a call would make it.
        parent = f"00-{TRACE}-{'1' * 16}-01"
        assert a.get(f"{ROOT}/items/9?slow=1", headers={"traceparent": parent}).text == "item"
        assert b.get(f"{ROOT}/price/9", headers={"traceparent": f"00-{TRACE}-{'2' * 16}-01"})
        front.core.writer.flush(5)
        back.core.writer.flush(5)
        yield a, b, store


def _links(page: str) -> list[str]:
    return [html.unescape(href) for href in re.findall(r'(?:href|src)="([^"]+)"', page)]


def _all_answer(client: httpx.Client, page: str) -> list[str]:
    links = _links(page)
    assert links
    for link in links:
        response = client.get(link)
        assert response.status_code == 200, (link, response.text[:200])
    return links


def _row(client: httpx.Client, route: str) -> dict[str, Any]:
    rows = client.get(VIEWER, params={"format": "json"}).json()["profiles"]
    [row] = [r for r in rows if r["trace_id"] == TRACE and r["route"] == route]
    return row


def test_profile_frame_names_the_request_and_its_links_answer(
    services: tuple[httpx.Client, httpx.Client, MemoryStore],
) -> None:
    front, _, _ = services
    row = _row(front, "/items/{n}")
    assert row["service"] == "frontend"
    page = front.get(row["url"])
    assert page.status_code == 200
    body = page.text
    title = re.search(r"<title>(.*?)</title>", body)
    assert title is not None
    assert re.fullmatch(r"GET /items/\{n\} [0-9]+ ms · otelprof", html.unescape(title[1]))
    for fact in (TRACE, row["span_id"], "frontend", "/items/{n}", ">200<"):
        assert fact in html.unescape(body), fact
    assert f"{row['duration_ms']:.1f} ms" in body
    links = _all_answer(front, body)
    span = row["span_id"]
    assert f"{VIEWER}/{TRACE}/diff?span_id={span}" in links
    assert f"{VIEWER}/route?route=%2Fitems%2F%7Bn%7D" in links  # the route baseline
    assert f"{VIEWER}/{TRACE}" in links and VIEWER in links
    assert f"{VIEWER}/{TRACE}/flame?span_id={span}" in links  # the iframe, below the prefix
    flame = front.get(f"{VIEWER}/{TRACE}/flame", params={"span_id": span})
    assert "marker_alpha" in flame.text and "fonts.googleapis" not in flame.text


def test_trace_page_lists_both_services_in_start_order(
    services: tuple[httpx.Client, httpx.Client, MemoryStore],
) -> None:
    front, back, _ = services
    # Either service's viewer shows the whole trace: the store is shared.
    for client in (front, back):
        page = client.get(f"{VIEWER}/{TRACE}")
        assert page.status_code == 200
        body = page.text
        assert "2 profiled spans of this trace" in body and "from 2 services" in body
        rows = re.findall(r"<tr><td>(.*?)</td><td><a href=\"([^\"]+)\">", body)
        assert [service for service, _ in rows] == ["frontend", "pricing"]
        assert re.search(r'style="left:0\.000%;width:', body), "the first span starts at 0"
        _all_answer(client, body)


def test_diff_marks_the_slow_marker_slower(
    services: tuple[httpx.Client, httpx.Client, MemoryStore],
) -> None:
    front, _, _ = services
    row = _row(front, "/items/{n}")
    page = front.get(f"{VIEWER}/{TRACE}/diff", params={"span_id": row["span_id"]})
    assert page.status_code == 200
    frames = re.findall(r'<g class="frame (\w+)" data-function="([^"]*)">', page.text)
    assert ("slower", "marker_alpha") in frames, frames
    assert "3 other recent profiles" in page.text
    _all_answer(front, page.text)


def test_index_shows_a_histogram_per_route(
    services: tuple[httpx.Client, httpx.Client, MemoryStore],
) -> None:
    front, _, _ = services
    body = front.get(VIEWER).text
    routes = body[body.index("<h2>Routes</h2>") : body.index("<h2>Profiles</h2>")]
    assert routes.count('<svg class="histogram"') == 2  # /items/{n} and /price/{n}
    assert 'aria-label="4 durations from' in routes  # three usual requests and the slow one
    assert 'aria-label="1 duration from' in routes  # /price/{n}
    assert "<script" not in body
    _all_answer(front, body)


def test_bad_input_on_the_new_pages(
    services: tuple[httpx.Client, httpx.Client, MemoryStore],
) -> None:
    front, _, _ = services
    unknown = "f" * 32
    assert front.get(f"{VIEWER}/{unknown}").status_code == 404
    assert front.get(f"{VIEWER}/{unknown}/flame").status_code == 404
    assert front.get(f"{VIEWER}/{TRACE.upper()}").status_code == 400
    assert front.get(f"{VIEWER}/{TRACE}/flame", params={"span_id": "zz"}).status_code == 400
    assert front.get(f"{VIEWER}/{TRACE}/flame").status_code == 400  # two spans: pick one
    assert front.get(f"{VIEWER}/{TRACE}", params={"span_id": "f" * 16}).status_code == 404
    evil = "/<script>alert(1)</script>"
    answer = front.get(f"{VIEWER}/route", params={"route": evil})
    assert answer.status_code == 404 and "<script" not in answer.text
    answer = front.get(VIEWER, params={"route": evil})
    assert answer.status_code == 200 and "<script>alert" not in answer.text
