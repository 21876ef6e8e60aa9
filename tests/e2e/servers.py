"""Start real uvicorn / gunicorn processes on 127.0.0.1 for the end-to-end tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from ..helpers import stop_group, wait_answering

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@dataclass
class Server:
    base_url: str
    state_dir: Path
    spans_dir: Path
    process: subprocess.Popen[bytes]
    log: Path
    mode: str = "hook"

    def spans(self) -> list[dict[str, Any]]:
        spans: list[dict[str, Any]] = []
        for path in self.spans_dir.glob("spans-*.jsonl"):
            text = path.read_text()
            # Complete lines only: the server may be writing the last one right now.
            for line in text[: text.rfind("\n") + 1].splitlines():
                if line.strip():
                    spans.append(json.loads(line))
        return spans

    def server_spans(self) -> list[dict[str, Any]]:
        return [s for s in self.spans() if s["kind"] == "SpanKind.SERVER"]


def request_path(span: dict[str, Any]) -> str:
    """An exported server span's request path, without its query: ``url.path`` in the new
    HTTP conventions, ``http.target`` in the old ones that OTel's generic ASGI/WSGI
    middleware still emits."""
    attributes = span["attributes"]
    return str(attributes.get("url.path") or attributes.get("http.target", "")).split("?")[0]


@contextmanager
def run_server(
    command: Sequence[str],
    tmp: Path,
    *,
    env: dict[str, str] | None = None,
    port: int,
    host: str = "127.0.0.1",
) -> Iterator[Server]:
    state_dir, spans_dir = tmp / "state", tmp / "spans"
    log = tmp / "server.log"
    full_env = {
        **os.environ,
        "OTELPROF_STATE_DIR": str(state_dir),
        "OTELPROF_DEMO_SPANS_DIR": str(spans_dir),
        "OTELPROF_SAMPLE_RATE": "1",
        "PYTHONPATH": str(ROOT),
        **(env or {}),
    }
    with open(log, "wb") as out:
        process = subprocess.Popen(
            list(command),
            cwd=ROOT,
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(f"http://{host}:{port}", state_dir, spans_dir, process, log)
    try:
        _wait_ready(server)
        yield server
    finally:
        stop_group(process)


def _wait_ready(server: Server, timeout: float = 30.0) -> None:
    wait_answering(
        server.base_url + "/debug/profile?format=json",
        server.process,
        server.log.read_text,
        timeout=timeout,
    )


def uvicorn(
    app: str, port: int, workers: int = 2, *, host: str = "127.0.0.1", access_log: bool = False
) -> list[str]:
    command = [
        str(BIN / "python"),
        "-m",
        "uvicorn",
        app,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    return command if access_log else [*command, "--no-access-log"]


def gunicorn(
    app: str, port: int, workers: int = 2, threads: int = 4, worker_class: str = "gthread"
) -> list[str]:
    return [
        str(BIN / "python"),
        "-m",
        "gunicorn",
        app,
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
        "--worker-class",
        worker_class,
        "--threads",
        str(threads),
    ]


def fetch_profile(url: str, fmt: str = "text", timeout: float = 10.0) -> httpx.Response:
    """GET a profile link, waiting for the background writer to store it."""
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.get(url + f"&format={fmt}", timeout=10.0)
        if response.status_code != 404 or time.monotonic() > deadline:
            return response
        time.sleep(0.1)
