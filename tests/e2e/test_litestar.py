"""Litestar (pure ASGI) under uvicorn: the profile holds the handler's work, a
``sync_to_thread`` handler's frames included, the index and the span use Litestar's
route template (``scope["path_template"]``), and the span's link opens the profile."""

from __future__ import annotations

import secrets
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from otelprof_middleware.profiling._span import PROFILE_URL

from ..helpers import free_port
from .servers import Server, fetch_profile, run_server, uvicorn

pytestmark = pytest.mark.e2e

# path -> (route template, the marker function its profile must hold, expected JSON)
CASES = {
    "/items/7": ("/items/{item_id}", "marker_litestar_async_work", {"item_id": 7}),
    "/reports/q3": ("/reports/{name}", "marker_litestar_thread_work", {"report": "q3"}),
}


def _span(server: Server, trace_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        for span in server.server_spans():
            if span["context"]["trace_id"].removeprefix("0x") == trace_id:
                return span
        assert time.monotonic() < deadline, server.server_spans()
        time.sleep(0.1)


def test_litestar_under_uvicorn(tmp_path: Path) -> None:
    port = free_port()
    command = uvicorn("tests.e2e.litestar_app:app", port, workers=1)
    with (
        run_server(command, tmp_path, port=port) as server,
        httpx.Client(base_url=server.base_url, timeout=30) as client,
    ):
        traces: dict[str, str] = {}
        for path, (_, _, body) in CASES.items():
            trace_id = secrets.token_hex(16)
            traces[path] = trace_id
            headers = {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}
            response = client.get(path, headers=headers)
            assert (response.status_code, response.json()) == (200, body)
        health_trace = secrets.token_hex(16)
        health_headers = {"traceparent": f"00-{health_trace}-{secrets.token_hex(8)}-01"}
        assert client.get("/health", headers=health_headers).text == "ok"
        assert client.get("/nowhere").status_code == 404

        for path, (template, marker, _) in CASES.items():
            span = _span(server, traces[path])
            assert span["name"] == f"GET {template}"
            assert span["attributes"]["http.route"] == template
            link = span["attributes"][PROFILE_URL]
            profile = fetch_profile(link, "folded")
            assert profile.status_code == 200, (link, profile.text)
            assert marker in profile.text
            others = {m for _, m, _ in CASES.values()} - {marker}
            assert not any(other in profile.text for other in others), profile.text
            html = fetch_profile(link, "html")
            assert html.status_code == 200 and "<html" in html.text.lower()

        index = client.get("/debug/profile", params={"format": "json"}).json()["profiles"]
        routes = {row["trace_id"]: row["route"] for row in index}
        for path, (template, _, _) in CASES.items():
            assert routes[traces[path]] == template
        assert health_trace not in routes  # exclude_paths
        # We open no span for an excluded path (Litestar has no OTel of its own here).
        assert all(
            s["context"]["trace_id"].removeprefix("0x") != health_trace
            for s in server.server_spans()
        )


def test_a_span_around_the_server_is_not_every_requests_span(tmp_path: Path) -> None:
    """uvicorn run from a CLI command's span: each request still gets its own span (a
    child of the command's, as OTel's ASGI middleware makes it) with its own link and
    profile. Before, every request joined the command's span: one profile key for all."""
    port = free_port()
    command = [sys.executable, "-m", "tests.e2e.cli_serve", str(port)]
    with (
        run_server(command, tmp_path, port=port) as server,
        httpx.Client(base_url=server.base_url, timeout=30) as client,
    ):
        for n in range(3):
            assert client.get(f"/items/{n}").json() == {"item_id": n}
        deadline = time.monotonic() + 10
        while True:
            spans = [s for s in server.spans() if s["attributes"].get("http.route")]
            if len(spans) >= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert len(spans) == 3, server.spans()
        links = {s["attributes"][PROFILE_URL] for s in spans}
        assert len(links) == 3
        expected = {s["context"]["span_id"].removeprefix("0x") for s in spans}
        while True:  # (the writer thread stores them)
            index = client.get("/debug/profile", params={"format": "json"}).json()["profiles"]
            stored = {row["span_id"] for row in index if row["route"] == "/items/{item_id}"}
            if stored == expected or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert stored == expected
