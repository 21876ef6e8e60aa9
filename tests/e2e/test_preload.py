"""gunicorn ``--preload`` with an app that served requests in the master before forking."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from ..helpers import free_port
from .servers import gunicorn, run_server

pytestmark = pytest.mark.e2e

WARM_UP_REQUESTS = 40  # preload_app's (not imported here: importing it serves them)


def test_preload_workers_count_from_zero(tmp_path: Path) -> None:
    """Each worker's ``counters()`` are its own: the master's warm-up (its profiles written
    before the fork) is not counted again in every worker."""
    port = free_port()
    command = [*gunicorn("tests.e2e.preload_app:app", port, workers=2), "--preload"]
    with run_server(command, tmp_path, port=port) as server:
        first: dict[int, dict[str, Any]] = {}  # each worker's first answer
        no_reuse = httpx.Limits(max_keepalive_connections=0)
        # Requests one after another may all land on one worker (the kernel hands each new
        # connection to whichever worker accepts first: 40 of 40 did once, in CI): rounds
        # of 8 at once, each held 0.2 s, reach both.
        with (
            httpx.Client(base_url=server.base_url, timeout=10, limits=no_reuse) as client,
            ThreadPoolExecutor(max_workers=8) as pool,
        ):
            for _ in range(10):
                answers = pool.map(
                    lambda _: client.get("/counters", params={"hold": "0.2"}).json(), range(8)
                )
                for body in answers:
                    first.setdefault(body["pid"], body["counters"])
                if len(first) == 2:
                    break
        assert len(first) == 2, "the two workers did not both answer"
        for pid, counts in first.items():
            # Its own requests so far: the server's readiness probes and a few of these.
            assert counts.get("written", 0) < WARM_UP_REQUESTS, (pid, counts)
