"""End to end: a Flask request that gunicorn's sync worker kills for outliving ``--timeout``.

That request is the one whose profile is wanted most ("WORKER TIMEOUT" in the log, and
why?). gunicorn's arbiter sends the worker ``SIGABRT``; the worker raises ``SystemExit``
inside the view, which Flask never handles, and the process exits. The request's
profile must still reach the store (the exit drain), under its route (read from the
error's traceback: Flask has cleared its request from the environ, and sends no signal
for a ``BaseException``), kept as an error and linked from its span.

(Under gthread the arbiter never kills a worker for one slow request: its main thread
keeps notifying. uvicorn's gunicorn worker leaves ``SIGABRT`` at its default action, so
the process dies without running any Python: no profile, nothing we can do there.)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ..helpers import free_port
from .servers import Server, fetch_profile, gunicorn, run_server
from .test_defaults import PACKAGE_DEFAULTS

pytestmark = pytest.mark.e2e

ROUTE = "/reports/<int:report_id>"


@pytest.fixture(params=["defaults", "hook"])
def sync_worker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    """gunicorn's sync worker with a 1 s timeout (and ``--preload``, common with it), the
    middleware at the package defaults (blank: unset, over the suite's conftest) or in hook
    mode."""
    env = dict(PACKAGE_DEFAULTS)
    if request.param == "hook":
        env["OTELPROF_MODE"] = "hook"
    port = free_port()
    command = [
        *gunicorn("tests.e2e.timeout_flask:app", port, workers=1, threads=1, worker_class="sync"),
        "--timeout",
        "1",
        # The app imported once, before the fork: a worker importing it itself could
        # outlive the 1 s timeout while it boots on a slow machine, and be killed then.
        "--preload",
    ]
    with run_server(command, tmp_path, port=port, env=env) as server:
        yield server


def _killed_request_row(server: Server, deadline: float) -> dict[str, Any]:
    """The index row of the killed request, read from the worker gunicorn starts next."""
    while True:
        try:
            rows = httpx.get(server.base_url + "/debug/profile?format=json", timeout=5).json()
        except httpx.HTTPError:
            rows = {"profiles": []}  # (the next worker is still starting)
        found = [row for row in rows["profiles"] if row["route"] == ROUTE]
        if found or time.monotonic() > deadline:
            assert len(found) == 1, (rows, server.log.read_text())
            return found[0]
        time.sleep(0.2)


def test_a_request_killed_by_the_worker_timeout_keeps_its_profile(sync_worker: Server) -> None:
    try:
        status = httpx.get(sync_worker.base_url + "/reports/6000", timeout=15).status_code
    except httpx.HTTPError:
        status = None  # (gunicorn may close the connection instead of answering 500)
    assert status in (500, None)
    assert "WORKER TIMEOUT" in sync_worker.log.read_text()
    row = _killed_request_row(sync_worker, time.monotonic() + 20)
    assert row["status_code"] == 500
    assert row["kept_reason"] == "error"
    assert 900 <= row["duration_ms"] < 6000  # killed, not finished
    folded = fetch_profile(row["url"], "folded").text
    marker_us = sum(
        int(line.rsplit(" ", 1)[1]) for line in folded.splitlines() if "marker_outlived" in line
    )
    # The request spun in the marker until it was killed: most of its profile is there.
    assert marker_us >= 0.8 * row["duration_ms"] * 1000, folded
    spans = [s for s in sync_worker.server_spans() if s["attributes"].get("http.route") == ROUTE]
    assert len(spans) == 1, sync_worker.spans()
    [span] = spans
    assert span["name"] == f"GET {ROUTE}"
    assert span["status"]["status_code"] == "ERROR"
    assert span["context"]["trace_id"].removeprefix("0x") == row["trace_id"]
    assert "otelprof.profile.url" in span["attributes"]
