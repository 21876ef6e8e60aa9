"""Below a path prefix, under real servers: FastAPI(root_path=...), a Starlette Mount (the
middleware on the inner and on the outer app), gunicorn with SCRIPT_NAME, and nginx in
front (prefix-stripping to ``uvicorn --root-path``, prefix-keeping to gunicorn).

Every set-up is asked the same: the app's own routes answer as they would without us,
the viewer answers below the prefix, every link of its HTML and JSON index answers 200
through the same address, ``exclude_paths`` still excludes, and the link on the exported
span (real SDK, written to a file by the server process) opens the request's profile.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from html import unescape
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest

from otelprof_middleware.profiling._span import PROFILE_URL

from ..helpers import free_port, wait_answering
from .servers import Server, fetch_profile, gunicorn, run_server, uvicorn

pytestmark = pytest.mark.e2e

APPS = "tests.e2e.prefix_apps"
NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
)


@dataclass(frozen=True)
class Expect:
    """What a client of one set-up sends, and what the index shows."""

    app_prefix: str  # put before the app's own routes by the client
    viewer: str  # the viewer's path as the client sends it
    health: str  # an excluded path as the client sends it
    route: str  # the index's route for /items/7


BELOW_SVC = "/svc/debug/profile"


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if tag == "a" and name == "href" and value:
                self.hrefs.append(unescape(value))


def _traceparent() -> tuple[str, dict[str, str]]:
    trace_id = secrets.token_hex(16)
    return trace_id, {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}


def _span_of(server: Server, trace_id: str, *, linked: bool) -> dict[str, Any] | None:
    """The server span of ``trace_id``; waits for its link when ``linked``."""
    deadline = time.monotonic() + 10
    while True:
        spans = [
            s
            for s in server.server_spans()
            if s["context"]["trace_id"].removeprefix("0x") == trace_id
        ]
        done = any(PROFILE_URL in s["attributes"] for s in spans) if linked else bool(spans)
        if done or time.monotonic() > deadline:
            return spans[0] if spans else None
        time.sleep(0.1)


def _check(server: Server, base: str, expect: Expect) -> None:
    """The questions every set-up answers; ``base`` is where the client connects."""
    with httpx.Client(base_url=base, timeout=30) as client:
        # The app's own routes, as without us.
        item_trace, item_headers = _traceparent()
        item = client.get(expect.app_prefix + "/items/7", headers=item_headers)
        assert (item.status_code, item.json()) == (200, {"item_id": 7}), item.text
        health_trace, health_headers = _traceparent()
        assert client.get(expect.health, headers=health_headers).status_code == 200
        assert client.get(expect.app_prefix + "/nowhere").status_code == 404

        # The exported span's link opens this request's profile through the same address.
        span = _span_of(server, item_trace, linked=True)
        assert span is not None and PROFILE_URL in span["attributes"], server.server_spans()
        link = span["attributes"][PROFILE_URL]
        assert link.startswith(f"{base}{expect.viewer}/{item_trace}?span_id="), link
        profile = fetch_profile(link, "folded")
        assert profile.status_code == 200, (link, profile.text)
        assert "marker_prefix_work" in profile.text

        # exclude_paths still excludes below the prefix: no link, no stored profile.
        health_span = _span_of(server, health_trace, linked=False)
        assert health_span is None or PROFILE_URL not in health_span["attributes"]

        # The JSON index: below the prefix, its urls open through the same address.
        index = client.get(expect.viewer, params={"format": "json"})
        assert index.status_code == 200, index.text
        rows = index.json()["profiles"]
        assert health_trace not in {row["trace_id"] for row in rows}
        [row] = [row for row in rows if row["trace_id"] == item_trace]
        assert row["url"] == link
        assert row["route"] == expect.route
        assert all(row["url"].startswith(base + expect.viewer + "/") for row in rows)
        for row in rows:
            assert fetch_profile(row["url"]).status_code == 200, row["url"]

        # The HTML index: every link is below the prefix and answers 200.
        page = client.get(expect.viewer)
        assert page.status_code == 200, page.text
        parser = _Links()
        parser.feed(page.text)
        assert parser.hrefs, page.text
        for href in dict.fromkeys(parser.hrefs):
            assert href.startswith(expect.viewer), href
            answer = client.get(href)
            assert answer.status_code == 200, (href, answer.status_code, answer.text[:300])


INNER = Expect("/svc", BELOW_SVC, "/svc/health", "/items/{item_id:int}")


def test_fastapi_root_path_under_uvicorn(tmp_path: Path) -> None:
    """``FastAPI(root_path="/svc")``: reached directly, the path with and without the
    prefix both reach the app (Starlette strips a leading root_path), and so the viewer."""
    port = free_port()
    command = uvicorn(f"{APPS}:fastapi_root_path", port, workers=1)
    with run_server(command, tmp_path, port=port) as server:
        _check(
            server, server.base_url, Expect("/svc", BELOW_SVC, "/svc/health", "/items/{item_id}")
        )
        assert httpx.get(server.base_url + "/items/8").json() == {"item_id": 8}
        assert httpx.get(server.base_url + "/debug/profile?format=json").status_code == 200


def test_starlette_mount_middleware_on_the_inner_app(tmp_path: Path) -> None:
    port = free_port()
    with run_server(uvicorn(f"{APPS}:mount_inner", port, workers=1), tmp_path, port=port) as s:
        _check(s, s.base_url, INNER)
        # The outer app has no viewer and no route of its own there.
        assert httpx.get(s.base_url + "/debug/profile").status_code == 404


def test_starlette_mount_middleware_on_the_outer_app(tmp_path: Path) -> None:
    """The middleware's app is mounted at ``/``: ``/svc`` is one of its own routes, so its
    viewer is at ``/debug/profile`` and its index shows the whole template."""
    port = free_port()
    with run_server(uvicorn(f"{APPS}:mount_outer", port, workers=1), tmp_path, port=port) as s:
        _check(
            s,
            s.base_url,
            Expect("/svc", "/debug/profile", "/svc/health", "/svc/items/{item_id:int}"),
        )
        assert httpx.get(s.base_url + "/svc/debug/profile").status_code == 404  # the inner app's


def test_flask_under_gunicorn_with_script_name(tmp_path: Path) -> None:
    port = free_port()
    command = gunicorn(f"{APPS}:flask_app", port, workers=2, threads=2)
    env = {"SCRIPT_NAME": "/svc"}
    with run_server(command, tmp_path, port=port, env=env) as server:
        _check(
            server,
            server.base_url,
            Expect("/svc", BELOW_SVC, "/svc/health", "/items/<int:item_id>"),
        )


@contextmanager
def run_nginx(tmp: Path, upstream_port: int, *, strip_prefix: bool) -> Iterator[str]:
    """nginx in the foreground on a free port, proxying ``/svc/`` to the upstream.

    ``strip_prefix``: ``proxy_pass`` with a URI, so the app gets ``/items/7`` for
    ``/svc/items/7`` (and is told the prefix: ``uvicorn --root-path``, and the
    ``X-Forwarded-Prefix`` header many proxies set); else the path goes on unchanged.
    """
    assert NGINX is not None
    port = free_port()
    conf_dir = tmp / "nginx"
    conf_dir.mkdir()
    target = f"http://127.0.0.1:{upstream_port}" + ("/" if strip_prefix else "")
    (conf_dir / "nginx.conf").write_text(
        f"""
daemon off;
master_process off;
worker_processes 1;
pid {conf_dir}/nginx.pid;
error_log {conf_dir}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {conf_dir}/client_body;
    proxy_temp_path {conf_dir}/proxy;
    fastcgi_temp_path {conf_dir}/fastcgi;
    uwsgi_temp_path {conf_dir}/uwsgi;
    scgi_temp_path {conf_dir}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location /svc/ {{
            proxy_pass {target};
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-Prefix /svc;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}
}}
"""
    )
    log = conf_dir / "stdout.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [NGINX, "-p", str(conf_dir), "-e", str(conf_dir / "error.log"), "-c", "nginx.conf"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_answering(base + "/", process, log.read_text, what="nginx", timeout=10)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


needs_nginx = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (apt-get install nginx; .ci/run does)"
)


@needs_nginx
def test_behind_nginx_stripping_the_prefix_to_uvicorn_root_path(tmp_path: Path) -> None:
    """What a real deployment does: the proxy strips ``/svc``, ``uvicorn --root-path``
    tells the app."""
    port = free_port()
    command = [*uvicorn(f"{APPS}:fastapi_plain", port, workers=2), "--root-path", "/svc"]
    with (
        run_server(command, tmp_path, port=port) as server,
        run_nginx(tmp_path, port, strip_prefix=True) as proxy,
    ):
        _check(server, proxy, Expect("/svc", BELOW_SVC, "/svc/health", "/items/{item_id}"))
        assert httpx.get(proxy + "/debug/profile").status_code == 404  # not proxied


@needs_nginx
def test_behind_nginx_keeping_the_prefix_to_gunicorn_script_name(tmp_path: Path) -> None:
    """The proxy passes ``/svc/...`` on; gunicorn's ``SCRIPT_NAME`` splits it off."""
    port = free_port()
    command = gunicorn(f"{APPS}:flask_app", port, workers=2, threads=2)
    with (
        run_server(command, tmp_path, port=port, env={"SCRIPT_NAME": "/svc"}) as server,
        run_nginx(tmp_path, port, strip_prefix=False) as proxy,
    ):
        _check(server, proxy, Expect("/svc", BELOW_SVC, "/svc/health", "/items/<int:item_id>"))
