"""uWSGI, as Flask and Django shops run it: workers forked from C after the app loaded.

uWSGI forks its workers without Python's after-fork hooks, and with a master it forks them
with the GIL released. An app that serves requests while it loads (a warm-up at import)
did so in the process that forks: our threads started there left a worker's GIL held for
good, or Python's thread state stale, and that worker hung (1 start in 4 to 7 with
``--master``, 4 in 10 without); and the workers, believing they had the loading
process's sampler thread, recorded empty profiles. Skipped where uwsgi is not installed
(it is in the test extra; it compiles at install).
"""

from __future__ import annotations

import json
import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from ..helpers import free_port
from .attribution import attribute
from .servers import BIN, run_server
from .test_honest import _stored

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not (BIN / "uwsgi").exists(), reason="uwsgi is not installed"),
]

MARKER_SECONDS = 0.3


def _uwsgi(port: int, *options: str) -> list[str]:
    return [
        str(BIN / "uwsgi"),
        "--http",
        f"127.0.0.1:{port}",
        "--module",
        "tests.e2e.uwsgi_app:app",
        "--need-app",
        "--die-on-term",
        *options,
    ]


@pytest.mark.parametrize(
    "options", [("--master", "--processes", "2"), ("--processes", "2")], ids=["master", "no-master"]
)
def test_uwsgi_workers_forked_after_a_warm_up_profile_their_own_requests(
    tmp_path: Path, options: tuple[str, ...]
) -> None:
    port = free_port()
    with run_server(_uwsgi(port, *options), tmp_path, port=port) as server:
        # The process that loaded the app and forked the workers ran no thread of ours.
        [loader_file] = server.state_dir.glob("loader-*.json")
        loader = json.loads(loader_file.read_text())
        assert not [name for name in loader["threads"] if name.startswith("otelprof")], loader
        assert loader["counters"].get("skipped.uwsgi_before_fork") == 5, loader
        # Concurrent slow requests reach both workers: each profile holds its own marker.
        sent: dict[str, int] = {}

        def slow(n: int) -> int:
            trace_id = secrets.token_hex(16)
            sent[trace_id] = n
            headers = {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}
            response = httpx.get(f"{server.base_url}/marker/{n}", headers=headers, timeout=30)
            return response.status_code

        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(slow, range(8))) == [200] * 8
        records = _stored(server, list(sent))
        assert set(records) == set(sent), "a slow request's profile is missing"
        for trace_id, n in sent.items():
            result = attribute(records[trace_id].session(), n)
            assert not result.foreign, (n, result.foreign)
            assert result.own_fraction(MARKER_SECONDS) >= 0.7, (n, result)
        # Each worker counts its own: the loading process's are not inherited (without a
        # master, the loading process goes on as worker 1, with its own).
        loader_pid = int(loader_file.stem.split("-")[1])
        workers = {}
        no_reuse = httpx.Limits(max_keepalive_connections=0)  # (uWSGI's router closes them)
        with httpx.Client(base_url=server.base_url, timeout=10, limits=no_reuse) as client:
            for _ in range(20):
                body = client.get("/counters").json()
                workers[body["pid"]] = body["counters"]
        for pid, counts in workers.items():
            expected = 5 if pid == loader_pid else None
            assert counts.get("skipped.uwsgi_before_fork") == expected, workers
