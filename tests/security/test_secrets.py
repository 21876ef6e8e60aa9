"""Nothing sensitive is stored: secrets sent in headers, cookies, query strings, paths and
bodies of profiled requests appear nowhere in the store.

The store is scanned as raw bytes (the SQLite file and its ``-wal``/``-shm`` files,
while the server runs and after it stopped) and decoded (every summary row and every
decompressed session JSON). pyinstrument records function names, file names and line
numbers, not local variables; the summary holds the route template, not the raw path.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from flask import Response, jsonify, request

from otelprof_middleware import WSGIProfilingMiddleware
from otelprof_middleware._record import ProfileSummary
from otelprof_middleware.stores import SQLiteStore

from ..e2e.servers import run_server, uvicorn
from ..helpers import free_port, make_provider, make_record, marker_alpha
from ..test_wsgi import Client, make_flask
from ._support import TALLY

KINDS = ("authorization", "apikey", "cookie", "query", "path", "body", "form", "trigger")


def _secrets() -> dict[str, str]:
    """One unique secret per place; lowercase letters and digits, so every encoding
    (percent, JSON, form) leaves it as is."""
    return {kind: f"s3cr3t{kind}{uuid.uuid4().hex}" for kind in KINDS}


def _headers(secrets: Mapping[str, str]) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {secrets['authorization']}",
        "X-Api-Key": secrets["apikey"],
        "Cookie": f"session={secrets['cookie']}; theme=dark",
        "X-Otelprof": secrets["trigger"],  # a wrong token, as a trigger value
    }


def scan_bytes(blobs: Mapping[str, bytes], secrets: Mapping[str, str]) -> list[str]:
    """Where any secret (or its random part alone) occurs in ``blobs``."""
    leaks = []
    for where, data in blobs.items():
        for kind, secret in secrets.items():
            if secret.encode() in data or secret[-32:].encode() in data:
                leaks.append(f"{kind} secret in {where}")
    return leaks


def store_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def decoded_store(path: Path) -> tuple[list[ProfileSummary], dict[str, bytes]]:
    """Every summary and every decompressed session, plus a SQL dump of every table."""
    store = SQLiteStore(path)
    try:
        summaries = list(store.list(limit=1000))
        blobs: dict[str, bytes] = {}
        for s in summaries:
            blobs[f"summary {s.trace_id}"] = json.dumps(s.to_json()).encode()
            for record in store.get(s.trace_id, s.span_id):
                blobs[f"session {s.trace_id}"] = zlib.decompress(record.payload)
    finally:
        store.close()
    conn = sqlite3.connect(path)
    try:
        blobs["sql dump"] = "\n".join(conn.iterdump()).encode()
    finally:
        conn.close()
    return summaries, blobs


def _sessions_sampled(blobs: Mapping[str, bytes]) -> int:
    return sum(
        1 for k, v in blobs.items() if k.startswith("session") and json.loads(v)["frame_records"]
    )


def test_the_scan_finds_a_secret_that_is_there(tmp_path: Path) -> None:
    """The scanner's own control: a secret put into the route is found, raw and decoded."""
    secrets = _secrets()
    path = tmp_path / "profiles.db"
    store = SQLiteStore(path)
    payload = zlib.compress(json.dumps({"x": secrets["body"]}).encode())
    store.put(
        make_record(
            trace_id="1" * 32,
            span_id="a" * 16,
            route=secrets["path"],
            duration_ms=1.0,
            start_time=1.0,
            payload=payload,
        )
    )
    assert scan_bytes(store_files(tmp_path), {"path": secrets["path"]})
    store.close()
    _, blobs = decoded_store(path)
    assert scan_bytes(blobs, secrets) == [
        f"path secret in summary {'1' * 32}",
        f"body secret in session {'1' * 32}",
        "path secret in sql dump",
    ]


def _wait_for(url: str, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        rows: list[dict[str, Any]] = httpx.get(url, timeout=5).json()["profiles"]
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


MODES = pytest.mark.parametrize("mode", ["hook", "always_on"])


@pytest.mark.e2e
@MODES
def test_nothing_sensitive_stored_by_the_demo_under_uvicorn(tmp_path: Path, mode: str) -> None:
    secrets = _secrets()
    headers = _headers(secrets)
    port = free_port()
    command = uvicorn("tests.security.secrets_app:app", port, workers=1)
    with run_server(command, tmp_path, port=port, env={"OTELPROF_MODE": mode}) as server:
        plan: list[tuple[str, str, dict[str, Any]]] = [
            ("GET", f"/cpu?ms=10&api_key={secrets['query']}", {}),
            ("GET", f"/items/42?token={secrets['query']}", {}),
            ("GET", f"/io?ms=5&password={secrets['query']}", {}),
            ("GET", f"/stream?chunks=5&sig={secrets['query']}", {}),
            ("GET", f"/sync?rows=500&session={secrets['query']}", {}),
            ("POST", "/orders", {"json": {"card": secrets["body"], "password": secrets["form"]}}),
            ("GET", f"/items/{secrets['path']}", {}),  # 422: not an int; route matched
            ("GET", f"/no/such/page/{secrets['path']}", {}),  # 404: no route
            ("GET", f"/fail?session={secrets['query']}", {}),  # 500
        ]
        statuses = []
        no_reuse = httpx.Limits(max_keepalive_connections=0)  # /fail closes the connection
        with httpx.Client(base_url=server.base_url, timeout=30, limits=no_reuse) as client:
            for method, path, extra in plan:
                statuses.append(client.request(method, path, headers=headers, **extra).status_code)
        TALLY["requests sent"] += len(plan)
        assert statuses == [200, 200, 200, 200, 200, 200, 422, 404, 500]
        rows = _wait_for(server.base_url + "/debug/profile?format=json&limit=1000", len(plan))
        assert len(rows) == len(plan), "every request was profiled"
        state = server.state_dir
        running = store_files(state)
        assert {"profiles.db", "profiles.db-wal", "profiles.db-shm"} <= set(running)
        assert scan_bytes(running, secrets) == []
    assert scan_bytes(store_files(state), secrets) == []  # after the checkpoint at exit
    summaries, blobs = decoded_store(state / "profiles.db")
    assert scan_bytes(blobs, secrets) == []
    # route templates only; the unmatched path is stored as ""
    expected = ["/cpu", "/items/{item_id}", "/io", "/stream", "/sync", "/orders", "/fail"]
    assert sorted(s.route for s in summaries) == sorted([*expected, "/items/{item_id}", ""])
    assert _sessions_sampled(blobs) >= 2, "the profiles hold real samples"


def _flask_with_body_endpoints() -> Any:
    app = make_flask()

    @app.post("/orders")
    def orders() -> Response:
        order = request.get_json()
        card, password = order["card"], order["password"]
        marker_alpha(0.03)  # long enough for a 5 ms always-on tick under load
        return jsonify(accepted=len(card) + len(password))

    @app.post("/login")
    def login() -> Response:
        password = request.form["password"]
        marker_alpha(0.03)
        return jsonify(ok=bool(password))

    return app


@MODES
def test_nothing_sensitive_stored_by_flask(tmp_path: Path, mode: str) -> None:
    secrets = _secrets()
    state = tmp_path / "state"
    app = _flask_with_body_endpoints()
    provider, _ = make_provider()
    middleware = WSGIProfilingMiddleware(
        app.wsgi_app,
        tracer_provider=provider,
        store=f"sqlite:///{state / 'profiles.db'}",
        sample_rate=1.0,
        min_duration_ms=0,
        mode=mode,
    )
    app.wsgi_app = middleware  # type: ignore[method-assign]
    client = Client(app, use_cookies=False)
    environ = {"REMOTE_ADDR": "127.0.0.1"}
    headers = list(_headers(secrets).items())
    try:
        answers = [
            client.get(
                f"/items/5?api_key={secrets['query']}", headers=headers, environ_base=environ
            ),
            client.get(f"/stream?sig={secrets['query']}", headers=headers, environ_base=environ),
            client.post(
                f"/orders?token={secrets['query']}",
                json={"card": secrets["body"], "password": secrets["body"]},
                headers=headers,
                environ_base=environ,
            ),
            client.post(
                "/login",
                data={"user": "ann", "password": secrets["form"]},
                headers=headers,
                environ_base=environ,
            ),
            client.get(f"/items/{secrets['path']}", headers=headers, environ_base=environ),
            client.get(f"/fail?session={secrets['query']}", headers=headers, environ_base=environ),
        ]
        TALLY["requests sent"] += len(answers)
        assert [a.status_code for a in answers] == [200, 200, 200, 200, 404, 500]
        assert middleware.core.writer.flush()
        running = store_files(state)
        assert {"profiles.db", "profiles.db-wal", "profiles.db-shm"} <= set(running)
        assert scan_bytes(running, secrets) == []
    finally:
        middleware.core.writer.close()
        middleware.core.get_store().close()
    assert scan_bytes(store_files(state), secrets) == []
    summaries, blobs = decoded_store(state / "profiles.db")
    assert scan_bytes(blobs, secrets) == []
    assert sorted(s.route for s in summaries) == sorted(
        ["/items/<int:item_id>", "/stream", "/orders", "/login", "", "/fail"]
    )
    assert _sessions_sampled(blobs) >= 2
