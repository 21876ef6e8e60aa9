"""End to end: real uvicorn and gunicorn processes, several workers, real exported spans."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from ..helpers import free_port
from .servers import Server, fetch_profile, gunicorn, request_path, run_server, uvicorn

pytestmark = pytest.mark.e2e

PROFILE_URL = "otelprof.profile.url"

# endpoint -> a function of the demo that its profile must show
DEMO_ENDPOINTS = {
    "/cpu?ms=40": "crunch_numbers",
    "/io?ms=30": "io",
    "/items/42": "load_settings",  # its sync dependency (the endpoint body itself is instant)
    "/stream?chunks=30": "render_chunk",
    "/fail": "fail",
}


def _warm_up(server: Server, rounds: int = 3) -> set[str]:
    """Send each endpoint a few times first; returns their trace ids.

    A worker's first requests to an endpoint run its lazy set-up (imports, FastAPI's
    endpoint introspection, abc caches): in hook mode that can dwarf, and shift, a streamed
    body's few milliseconds. Their profiles are linked and stored like any other; only
    the which-function-is-in-it check skips them.
    """
    trace_ids: set[str] = set()
    no_reuse = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=server.base_url, timeout=30, limits=no_reuse) as client:
        for _ in range(rounds):
            for path in DEMO_ENDPOINTS:
                trace_id = secrets.token_hex(16)
                trace_ids.add(trace_id)
                parent = f"00-{trace_id}-{secrets.token_hex(8)}-01"
                client.get(path, headers={"traceparent": parent})
    return trace_ids


def _links_by_route(server: Server) -> dict[str, list[str]]:
    links: dict[str, list[str]] = {}
    for span in server.server_spans():
        url = span["attributes"].get(PROFILE_URL)
        if url:
            links.setdefault(span["attributes"].get("http.route", span["name"]), []).append(url)
    return links


def _exercise(server: Server, rounds: int = 4) -> dict[str, list[httpx.Response]]:
    responses: dict[str, list[httpx.Response]] = {}
    # No keep-alive: an app exception makes uvicorn close the connection (as it should).
    no_reuse = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=server.base_url, timeout=30, limits=no_reuse) as client:
        for _ in range(rounds):
            for path in DEMO_ENDPOINTS:
                responses.setdefault(path, []).append(client.get(path))
    return responses


def _linked_spans(server: Server, expected_count: int) -> list[dict[str, Any]]:
    """Spans end after the response is sent (WSGI: at close()), so wait for the last ones."""
    deadline = time.monotonic() + 10
    while True:
        spans = server.server_spans()
        linked = [s for s in spans if PROFILE_URL in s["attributes"]]
        if len(linked) >= expected_count or time.monotonic() > deadline:
            return linked
        time.sleep(0.1)


def _check_every_link_opens_its_profile(server: Server, expected_count: int) -> None:
    spans = server.server_spans()
    linked = _linked_spans(server, expected_count)
    assert len(linked) == expected_count, [s["name"] for s in spans]
    for span in linked:
        url = span["attributes"][PROFILE_URL]
        trace_id = span["context"]["trace_id"].removeprefix("0x")
        span_id = span["context"]["span_id"].removeprefix("0x")
        assert url.endswith(f"/debug/profile/{trace_id}?span_id={span_id}")
        assert url.startswith(server.base_url)
        response = fetch_profile(url)
        assert response.status_code == 200, (url, response.text)
        assert response.headers["x-content-type-options"] == "nosniff"
        html = fetch_profile(url, "html")
        assert html.status_code == 200 and "<html" in html.text.lower()
    # Every worker writes into the one embedded store: whichever worker answers the
    # index lists the profiles of all of them.
    index = httpx.get(server.base_url + "/debug/profile?format=json&limit=1000").json()
    listed = {row["trace_id"] for row in index["profiles"]}
    assert {s["context"]["trace_id"].removeprefix("0x") for s in linked} <= listed


@pytest.fixture
def fastapi_server(tmp_path: Path) -> Iterator[Server]:
    port = free_port()
    with run_server(uvicorn("demo_app.fastapi_app:app", port, workers=2), tmp_path, port=port) as s:
        yield s


@pytest.fixture
def flask_server(tmp_path: Path) -> Iterator[Server]:
    port = free_port()
    command = gunicorn("demo_app.flask_app:app", port, workers=2, threads=4)
    with run_server(command, tmp_path, port=port) as s:
        yield s


def test_fastapi_under_uvicorn_two_workers(fastapi_server: Server) -> None:
    warm = _warm_up(fastapi_server)
    responses = _exercise(fastapi_server)
    assert all(r.status_code == 200 for p, rs in responses.items() if p != "/fail" for r in rs)
    assert all(r.status_code == 500 for r in responses["/fail"])
    total = sum(len(rs) for rs in responses.values()) + len(warm)
    _check_every_link_opens_its_profile(fastapi_server, total)
    for span in fastapi_server.server_spans():
        url = span["attributes"].get(PROFILE_URL)
        if url is None:  # the viewer's own requests: never profiled
            assert span["attributes"]["url.path"].startswith("/debug/profile")
            continue
        if span["context"]["trace_id"].removeprefix("0x") in warm:
            continue
        # Folded stacks hold every frame; the text tree drops those under 1% of the total
        # (a worker's cold first request can take 100 ms of lazy set-up).
        text = fetch_profile(url, "folded").text
        target = span["attributes"].get("url.path", "")
        for path, function in DEMO_ENDPOINTS.items():
            if path.split("?")[0] == target:
                assert function in text, (path, text)
    index = httpx.get(fastapi_server.base_url + "/debug/profile?format=json").json()
    routes = {row["route"] for row in index["profiles"]}
    assert {"/cpu", "/io", "/items/{item_id}", "/stream", "/fail"} <= routes
    starts = [row["start_time"] for row in index["profiles"]]
    assert starts == sorted(starts, reverse=True)
    fail_span = next(
        s for s in fastapi_server.server_spans() if s["attributes"].get("url.path") == "/fail"
    )
    assert fail_span["status"]["status_code"] == "ERROR"


def test_flask_under_gunicorn_two_gthread_workers(flask_server: Server) -> None:
    responses = _exercise(flask_server)
    assert all(r.status_code == 200 for p, rs in responses.items() if p != "/fail" for r in rs)
    total = sum(len(rs) for rs in responses.values())
    _check_every_link_opens_its_profile(flask_server, total)
    index = httpx.get(flask_server.base_url + "/debug/profile?format=json").json()
    routes = {row["route"] for row in index["profiles"]}
    assert {"/cpu", "/io", "/items/<int:item_id>", "/stream", "/fail"} <= routes
    for row in index["profiles"]:
        if row["route"] == "/cpu":
            assert "crunch_numbers" in fetch_profile(row["url"]).text
        if row["route"] == "/stream":
            assert "render_chunk" in fetch_profile(row["url"]).text


def test_concurrent_async_requests_never_mix_under_uvicorn(tmp_path: Path) -> None:
    port = free_port()
    command = uvicorn("tests.e2e.marker_app:app", port, workers=1)
    with run_server(command, tmp_path, port=port) as server:
        paths = ["/alpha" if i % 2 else "/beta" for i in range(64)]
        with (
            httpx.Client(base_url=server.base_url, timeout=30) as client,
            ThreadPoolExecutor(32) as pool,
        ):
            statuses = list(pool.map(lambda p: client.get(p).status_code, paths))
        assert statuses == [200] * 64
        checked = 0
        for span in _linked_spans(server, 64):
            url = span["attributes"].get(PROFILE_URL)
            if not url:
                continue
            text = fetch_profile(url, "folded").text
            path = request_path(span)
            own = "marker_alpha_work" if path == "/alpha" else "marker_beta_work"
            other = "marker_beta_work" if own == "marker_alpha_work" else "marker_alpha_work"
            assert own in text, text
            assert other not in text, text
            checked += 1
        assert checked == 64


def test_uvicorn_root_path(tmp_path: Path) -> None:
    """``uvicorn --root-path /svc`` (behind a prefix-stripping proxy): the viewer answers,
    ``exclude_paths`` excludes, and index and span links carry the prefix."""
    port = free_port()
    command = [*uvicorn("demo_app.fastapi_app:app", port, workers=1), "--root-path", "/svc"]
    env = {"OTELPROF_EXCLUDE_PATHS": "/cpu"}
    with run_server(command, tmp_path, port=port, env=env) as server:
        assert httpx.get(server.base_url + "/items/1").status_code == 200
        assert httpx.get(server.base_url + "/cpu?ms=5").status_code == 200
        links = [s["attributes"][PROFILE_URL] for s in _linked_spans(server, 1)]
        # (The span is exported as the request ends; the writer stores the profile on its
        # own thread, a moment later on a busy machine.)
        deadline = time.monotonic() + 10
        while True:
            index = httpx.get(server.base_url + "/debug/profile?format=json").json()
            if index["profiles"] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    [row] = index["profiles"]  # /cpu is excluded; the viewer's own requests are not profiled
    assert row["route"] == "/items/{item_id}"
    assert row["url"].startswith(server.base_url + "/svc/debug/profile/")
    assert links == [row["url"]]


@pytest.mark.parametrize("server_name", ["gunicorn", "uvicorn"])
def test_workers_recycled_under_load_lose_no_profile(server_name: str, tmp_path: Path) -> None:
    """The production recipes ``gunicorn --max-requests`` and ``uvicorn
    --limit-max-requests``: each worker exits after a few requests, with others in
    flight, and a new one starts. Every request still has its span, every span its link,
    every link its profile in the store, in the default mode with every profile kept.
    (The leaving worker's writer has usually emptied its queue before the worker exits:
    this passes without the exit drain too, which ``tests/test_exit_flush.py`` covers.)"""
    port = free_port()
    if server_name == "gunicorn":
        command = [
            *gunicorn("demo_app.flask_app:app", port, workers=2, threads=4),
            "--max-requests",
            "12",
            "--max-requests-jitter",
            "4",
        ]
        recycled = "Autorestarting worker after current request"
    else:
        command = [
            *uvicorn("demo_app.fastapi_app:app", port, workers=2),
            "--limit-max-requests",
            "12",
        ]
        recycled = "Maximum request limit"
    env = {"OTELPROF_MODE": ""}  # the default mode; the demo keeps every profile
    requests = 96
    with run_server(command, tmp_path, port=port, env=env) as server:

        def get(i: int) -> int | str:
            try:
                return httpx.get(server.base_url + f"/cpu?ms={10 + i % 5}", timeout=30).status_code
            except httpx.HTTPError as error:  # (a worker exiting as a connection opens)
                return type(error).__name__

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(get, range(requests)))
        answered = statuses.count(200)
        assert answered >= requests - 8, statuses
        log = server.log.read_text()
        assert log.count(recycled) >= 4, log
        deadline = time.monotonic() + 15
        while True:
            spans = [s for s in server.server_spans() if request_path(s) == "/cpu"]
            if len(spans) >= answered or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert len(spans) >= answered, (len(spans), statuses)
        assert all(PROFILE_URL in s["attributes"] for s in spans)
        index = httpx.get(server.base_url + "/debug/profile?format=json&limit=1000").json()
        listed = {(row["trace_id"], row["span_id"]) for row in index["profiles"]}
        linked = {
            (
                s["context"]["trace_id"].removeprefix("0x"),
                s["context"]["span_id"].removeprefix("0x"),
            )
            for s in spans
        }
        assert linked <= listed, sorted(linked - listed)
