"""Soak: uvicorn + the FastAPI demo, every request profiled, 64 connections, minutes long.

Usage::

    python bench/soak.py [--seconds N] [--connections 64] [--json PATH]

The duration defaults to ``OTELPROF_SOAK_SECONDS`` (600 when unset). The load mixes
``/io?ms=5`` and ``/cpu?ms=2``; it comes from ``wrk`` when ``/usr/bin/wrk`` exists, else
from a thread pool of httpx clients (one per connection). Every request is profiled
(``OTELPROF_SAMPLE_RATE=1``, ``OTELPROF_MAX_CONCURRENT`` = connections) into the embedded
SQLite store in a temporary state directory.

Measured: requests, errors (socket errors, timeouts, non-2xx), latency, the server's
RSS every 10 s (``/proc/<pid>/status``), the store's count and bytes against its bounds
and its integrity, and the server's log (otelprof warnings, tracebacks).

Passes (exit 0) when there are no errors, the store is within its bounds and intact,
the log has no traceback, and the RSS is flat: the last sample at most
``--rss-growth`` (default 10%) above the largest sample of the first minute. The
figures are printed, and written as JSON with ``--json``.

Only 127.0.0.1 and a free port are used; only the processes started here are stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
PATHS = ("/io?ms=5", "/cpu?ms=2")
STORE_MAX_PROFILES = 1000
STORE_MAX_BYTES = 64 * 1024 * 1024
RSS_INTERVAL = 10.0

# Runs uvicorn in this process; a thread writes the middleware's counters (written,
# dropped.queue_full, failed.*) to OTELPROF_SOAK_COUNTERS every second. (uvicorn ends
# by re-raising SIGTERM, so atexit handlers do not run.)
_BOOT = """
import json, os, sys, threading, time

def _dump_counters():
    from otelprof_middleware import counters
    path = os.environ["OTELPROF_SOAK_COUNTERS"]
    while True:
        time.sleep(1.0)
        with open(path + ".tmp", "w") as out:
            json.dump(counters(), out)
        os.replace(path + ".tmp", path)

threading.Thread(target=_dump_counters, name="soak-counters", daemon=True).start()
import uvicorn
sys.argv = ["uvicorn", *sys.argv[1:]]
uvicorn.main()
"""

_WRK_SCRIPT = """
local paths = {"/io?ms=5", "/cpu?ms=2"}
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", paths[n % 2 + 1])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"timeout": %d, "non_2xx": %d, "p50_us": %d, "p99_us": %d, "max_us": %d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.timeout,
    e.status, latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rss_kib(pid: int) -> int | None:
    """The resident set size of ``pid`` in KiB, or None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class RssSampler:
    """Samples a process's RSS every ``interval`` seconds on a thread."""

    def __init__(self, pid: int, interval: float) -> None:
        self.samples: list[tuple[float, int]] = []
        self._pid = pid
        self._interval = interval
        self._stop = threading.Event()
        self._start = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            value = rss_kib(self._pid)
            if value is not None:
                self.samples.append((round(time.monotonic() - self._start, 1), value))
            if self._stop.wait(self._interval):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        value = rss_kib(self._pid)
        if value is not None:
            self.samples.append((round(time.monotonic() - self._start, 1), value))


def start_server(
    port: int, tmp: Path, log: Path, connections: int, sample_rate: float
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OTELPROF_SAMPLE_RATE": str(sample_rate),
        "OTELPROF_SOAK_COUNTERS": str(tmp / "counters.json"),
        "OTELPROF_DEBUG_ROUTE": "true",
        "OTELPROF_MAX_CONCURRENT": str(connections),
        "OTELPROF_STATE_DIR": str(tmp / "state"),
        "OTELPROF_STORE_MAX_PROFILES": str(STORE_MAX_PROFILES),
        "OTELPROF_STORE_MAX_BYTES": str(STORE_MAX_BYTES),
    }
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTELPROF_DEMO_SPANS_DIR", "OTELPROF_STORE"):
        env.pop(name, None)
    command = [
        sys.executable,
        "-c",
        _BOOT,
        "demo_app.fastapi_app:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
    ]
    with open(log, "wb") as err:
        # Spans go to the console exporter; stdout is discarded.
        return subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )


def wait_ready(base_url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("the server exited:\n" + log.read_text())
        try:
            if httpx.get(base_url + "/io?ms=1", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise SystemExit("the server did not start:\n" + log.read_text())


def stop_server(process: subprocess.Popen[bytes]) -> None:
    """Stop the server we started (its own process group), gracefully first."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)


def load_with_wrk(
    wrk: str, base_url: str, seconds: int, connections: int, tmp: Path
) -> dict[str, Any]:
    script = tmp / "mix.lua"
    script.write_text(_WRK_SCRIPT)
    threads = max(1, min(connections, os.cpu_count() or 1, 4))
    command = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        base_url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120)
    if done.returncode != 0:
        raise SystemExit(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    line = [row for row in done.stdout.splitlines() if row.startswith("{")][-1]
    raw = json.loads(line)
    errors = {name: raw[name] for name in ("connect", "read", "write", "timeout", "non_2xx")}
    return {
        "tool": f"wrk -t{threads} -c{connections}",
        "requests": raw["requests"],
        "seconds": round(raw["duration_us"] / 1e6, 1),
        "errors": errors,
        "latency_ms": {
            "p50": raw["p50_us"] / 1000,
            "p99": raw["p99_us"] / 1000,
            "max": raw["max_us"] / 1000,
        },
    }


def load_with_httpx(base_url: str, seconds: int, connections: int) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    lock = threading.Lock()
    errors = {"transport": 0, "non_2xx": 0}
    latencies: list[float] = []
    sent = 0

    def run(index: int) -> None:
        nonlocal sent
        local: list[float] = []
        count = 0
        with httpx.Client(base_url=base_url, timeout=10) as client:
            while time.monotonic() < deadline:
                path = PATHS[(index + count) % len(PATHS)]
                count += 1
                started = time.perf_counter()
                try:
                    status = client.get(path).status_code
                except httpx.TransportError:
                    with lock:
                        errors["transport"] += 1
                    continue
                local.append(time.perf_counter() - started)
                if not 200 <= status < 300:
                    with lock:
                        errors["non_2xx"] += 1
        with lock:
            latencies.extend(local)
            sent += count

    started = time.monotonic()
    with ThreadPoolExecutor(connections) as pool:
        list(pool.map(run, range(connections)))
    latencies.sort()

    def percentile(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(len(latencies) * p))] * 1000, 3)

    return {
        "tool": f"httpx thread pool x{connections}",
        "requests": sent,
        "seconds": round(time.monotonic() - started, 1),
        "errors": errors,
        "latency_ms": {"p50": percentile(0.5), "p99": percentile(0.99), "max": percentile(1.0)}
        if latencies
        else {},
    }


def inspect_store(db: Path) -> dict[str, Any]:
    with closing(sqlite3.connect(db, timeout=10)) as conn:
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        count, total = conn.execute("SELECT count, bytes FROM totals").fetchone()
        rows = conn.execute("SELECT count(*) FROM profiles").fetchone()[0]
        span = conn.execute("SELECT min(start_time), max(start_time) FROM profiles").fetchone()
        routes = dict(
            conn.execute("SELECT route, count(*) FROM profiles GROUP BY route").fetchall()
        )
    files = {p.name: p.stat().st_size for p in db.parent.glob(db.name + "*")}
    covered = (span[1] - span[0]) if span[0] is not None else 0.0
    return {
        "integrity": integrity,
        "count": count,
        "rows": rows,
        "bytes": total,
        "max_profiles": STORE_MAX_PROFILES,
        "max_bytes": STORE_MAX_BYTES,
        "routes": routes,
        "file_bytes": files,
        # the newest max_profiles profiles cover this many seconds: the write rate
        "written_per_s_at_end": round(count / covered, 1) if covered > 0 else None,
    }


def scan_log(log: Path) -> dict[str, Any]:
    text = log.read_text(errors="replace")
    warnings = [line for line in text.splitlines() if "otelprof:" in line]
    return {"tracebacks": text.count("Traceback"), "otelprof_warnings": warnings[:20]}


def run(seconds: int, connections: int, rss_growth: float, sample_rate: float) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="otelprof-soak-"))
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log = tmp / "server.log"
    state = tmp / "state"
    server = start_server(port, tmp, log, connections, sample_rate)
    try:
        wait_ready(base_url, server, log)
        sampler = RssSampler(server.pid, RSS_INTERVAL)
        wrk = "/usr/bin/wrk"
        load: Callable[[], dict[str, Any]]
        if os.access(wrk, os.X_OK):
            load = lambda: load_with_wrk(wrk, base_url, seconds, connections, tmp)  # noqa: E731
        else:
            load = lambda: load_with_httpx(base_url, seconds, connections)  # noqa: E731
        result = load()
        time.sleep(3)  # the writer drains, the counters are written once more
        sampler.stop()
        index = httpx.get(base_url + "/debug/profile?format=json&limit=5", timeout=30)
        result["viewer_after_load"] = index.status_code
    finally:
        stop_server(server)
    result["store"] = inspect_store(state / "profiles.db")
    result["server_log"] = scan_log(log)
    counters = tmp / "counters.json"
    result["counters"] = json.loads(counters.read_text()) if counters.exists() else None
    samples = sampler.samples
    first_minute = max(kib for t, kib in samples if t <= 60.0)
    last = samples[-1][1]
    result["rss_mib"] = [(t, round(kib / 1024, 1)) for t, kib in samples]
    result["rss_first_minute_max_mib"] = round(first_minute / 1024, 1)
    result["rss_last_mib"] = round(last / 1024, 1)
    result["rss_growth_pct"] = round((last - first_minute) / first_minute * 100, 1)
    result["requests_per_s"] = round(result["requests"] / max(result["seconds"], 0.001), 1)
    store = result["store"]
    seen = result["counters"] or {}
    result["profiles"] = {
        "written": seen.get("written", 0),
        "dropped_queue_full": seen.get("dropped.queue_full", 0),
        "failed_store_put": seen.get("failed.store.put", 0),
        "skipped_concurrency_cap": seen.get("skipped.concurrency_cap", 0),
    }
    checks = {
        "no_errors": sum(result["errors"].values()) == 0,
        "viewer_ok": result["viewer_after_load"] == 200,
        "store_within_bounds": store["count"] <= STORE_MAX_PROFILES
        and store["bytes"] <= STORE_MAX_BYTES
        and store["count"] == store["rows"],
        "store_intact": store["integrity"] == "ok",
        "no_tracebacks": result["server_log"]["tracebacks"] == 0,
        "every_request_profiled": result["counters"] is not None
        and seen.get("skipped.concurrency_cap", 0) == 0,
        "rss_flat": result["rss_growth_pct"] <= rss_growth * 100,
    }
    result["checks"] = checks
    result["passed"] = all(checks.values())
    shutil.rmtree(tmp, ignore_errors=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds", type=int, default=int(os.environ.get("OTELPROF_SOAK_SECONDS", "600"))
    )
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--rss-growth", type=float, default=0.10, help="allowed RSS growth after minute one"
    )
    parser.add_argument(
        "--sample-rate", type=float, default=1.0, help="OTELPROF_SAMPLE_RATE (0: a baseline)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.seconds < 60:
        parser.error("--seconds must be at least 60 (RSS is compared with the first minute)")
    result = run(args.seconds, args.connections, args.rss_growth, args.sample_rate)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
