"""gunicorn's gevent worker: its threads are greenlets, which the always-on sampler cannot
see. With the defaults, no empty profile is kept and linked (it was: a 300 ms request kept
as "slow" with no sample); the worker says why, once; a triggered request still gets its
hook-mode profile, with its samples. Real gunicorn, real gevent."""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from otelprof_middleware.profiling._span import PROFILE_URL
from otelprof_middleware.stores import SQLiteStore

from ..helpers import free_port
from .servers import BIN, ROOT, run_server
from .test_defaults import PACKAGE_DEFAULTS, _seconds_under

pytestmark = pytest.mark.e2e
pytest.importorskip("gevent")


def _gevent_gunicorn(port: int) -> list[str]:
    """gunicorn serving ``tests.e2e.green_flask`` with one gevent worker."""
    return [
        *(str(BIN / "python"), "-m", "gunicorn", "tests.e2e.green_flask:app"),
        *("--bind", f"127.0.0.1:{port}", "--workers", "1", "--worker-class", "gevent"),
    ]


def _traceparent() -> tuple[str, dict[str, str]]:
    trace_id = secrets.token_hex(16)
    return trace_id, {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}


def test_gevent_worker_keeps_no_empty_profile_and_says_why(tmp_path: Path) -> None:
    port = free_port()
    command = _gevent_gunicorn(port)
    with run_server(command, tmp_path, port=port, env=PACKAGE_DEFAULTS) as server:
        with httpx.Client(base_url=server.base_url, timeout=10) as client:
            for _ in range(30):
                assert client.get("/fast").status_code == 200
            slow_trace, slow_headers = _traceparent()
            assert client.get("/spin", headers=slow_headers).text == "spun"
            triggered_trace, triggered_headers = _traceparent()
            triggered_headers["x-otelprof"] = "1"
            assert client.get("/spin", headers=triggered_headers).text == "spun"
        time.sleep(1.0)  # the writer stores in the background
        store = SQLiteStore(server.state_dir / "profiles.db")
        try:
            assert store.get(slow_trace) == []  # not an empty profile kept as "slow"
            [triggered] = store.get(triggered_trace)
        finally:
            store.close()
        assert (triggered.summary.kept_reason, triggered.summary.mode) == ("triggered", "hook")
        share = _seconds_under(triggered.session().frame_records, "green_marker_work") / 0.3
        assert share >= 0.7, share
        linked = {
            span["context"]["trace_id"].removeprefix("0x"): span["attributes"]
            for span in server.server_spans()
        }
        assert PROFILE_URL not in linked[slow_trace]
        assert PROFILE_URL in linked[triggered_trace]
        log = server.log.read_text()
        assert log.count("gevent has monkey-patched threading") == 1, log


def test_green_threads_names_the_patching_library() -> None:
    """In a fresh interpreter: nothing before gevent patches threading, gevent after."""
    code = (
        "from otelprof_middleware.profiling._always_on_start import green_threads\n"
        "import gevent.monkey\n"
        "before = green_threads()\n"
        "gevent.monkey.patch_all()\n"
        "print(before, green_threads())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.split() == ["None", "gevent"], out.stderr


def test_concurrent_triggered_greenlets_each_get_their_own_profile(tmp_path: Path) -> None:
    """The greenlets of a gevent worker share one OS thread, and with it one profile
    function: triggered requests in flight together share the worker's hook, each with
    its own samples. (Each greenlet had a hook object of its own: the second one saw the
    first one's hook as another profiler's and left its request unprofiled, counted as
    ``skipped.foreign_hook``.)"""
    port = free_port()
    command = _gevent_gunicorn(port)
    with run_server(command, tmp_path, port=port, env=PACKAGE_DEFAULTS) as server:

        def triggered(path: str) -> str:
            trace_id, headers = _traceparent()
            headers["x-otelprof"] = "1"
            with httpx.Client(base_url=server.base_url, timeout=10) as client:
                assert client.get(path, headers=headers).status_code == 200
            return trace_id

        paths = ["/alpha", "/beta"] * 3
        with ThreadPoolExecutor(len(paths)) as pool:
            trace_ids = list(pool.map(triggered, paths))
        time.sleep(1.0)  # the writer stores in the background
        store = SQLiteStore(server.state_dir / "profiles.db")
        try:
            kept = {trace_id: store.get(trace_id) for trace_id in trace_ids}
        finally:
            store.close()
    markers = {"/alpha": "green_alpha_work", "/beta": "green_beta_work"}
    for path, trace_id in zip(paths, trace_ids, strict=True):
        [record] = kept[trace_id]
        assert (record.summary.kept_reason, record.summary.mode) == ("triggered", "hook")
        frames = record.session().frame_records
        other = markers["/beta" if path == "/alpha" else "/alpha"]
        assert _seconds_under(frames, markers[path]) > 0, path
        assert _seconds_under(frames, other) == 0, path  # never the other greenlet's work
